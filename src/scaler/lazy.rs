//! A Redis connection made on first use: the autoscaler's parts must not hold up or fail a
//! process's start (its task store is already connected), and a Redis that is down at start
//! is tried again at the next use.

use std::time::Duration;

use redis::{RedisError, aio::ConnectionManager};
use tokio::sync::OnceCell;

#[derive(Clone)]
pub struct LazyRedis {
    client: redis::Client,
    conn: std::sync::Arc<OnceCell<ConnectionManager>>,
}

impl LazyRedis {
    /// Parses the URL only.
    pub fn new(url: &str) -> Result<Self, RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: Default::default(),
        })
    }

    pub async fn get(&self) -> Result<ConnectionManager, RedisError> {
        self.conn
            .get_or_try_init(|| {
                let cfg = crate::queue::redis::manager_config(Some(Duration::from_secs(5)));
                ConnectionManager::new_with_config(self.client.clone(), cfg)
            })
            .await
            .cloned()
    }
}
