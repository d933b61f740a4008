//! The one way infergate opens Redis, for every part that keeps something there (the task
//! store and its outboxes, the dead letters, the stream broker, the scaler, the cache): one
//! connection policy, one lazy handle, and one retry for commands that are safe to repeat.
//!
//! - A connection is a `ConnectionManager`: while Redis is away a command waits for at most
//!   one short reconnect (an attempt, ~100 ms, one more; each connect bounded to 1 s) and then
//!   fails, so a submitter gets its 503 at once and a worker backs off by itself. (The
//!   client's default, six retries with doubling delays, made every submission during an
//!   outage wait 8–11 s for its 503.)
//! - The manager learns that its connection died only when a command fails on it (broken
//!   pipe, reset), and reconnects then. The first command after a Redis restart would fail
//!   for nothing: [`Repeatable`] sends such a command once more, on the new connection. Only
//!   commands whose second run changes nothing the first did not (reads, writes of the same
//!   values, conditional scripts) go through it: a command that counts (a task's start) or
//!   appends (a stream entry) does not.

use std::time::Duration;

use redis::{
    Cmd, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::OnceCell;

/// The connection settings of every Redis client infergate opens; `None`: no response
/// timeout (a blocking read waits on the server by design).
pub fn manager_config(response_timeout: Option<Duration>) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_min_delay(Duration::from_millis(100))
        .set_number_of_retries(1)
        .set_response_timeout(response_timeout)
}

/// The response timeout of ordinary commands.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A managed connection to `url` with [`RESPONSE_TIMEOUT`].
pub async fn connect(url: &str) -> Result<ConnectionManager, RedisError> {
    connect_with(url, Some(RESPONSE_TIMEOUT)).await
}

/// A managed connection to `url` with the given response timeout.
pub async fn connect_with(
    url: &str,
    response_timeout: Option<Duration>,
) -> Result<ConnectionManager, RedisError> {
    let client = redis::Client::open(url)?;
    ConnectionManager::new_with_config(client, manager_config(response_timeout)).await
}

/// Whether a command failed because its connection was gone (so the manager reconnects). A
/// timeout is not: the server may be only slow (paused, loaded) and still run the command, so
/// sending it again would run it twice.
pub fn connection_lost(e: &RedisError) -> bool {
    (e.is_connection_dropped() || e.is_connection_refusal()) && !e.is_timeout()
}

/// A connection for commands that are safe to repeat: one that fails because the connection
/// was found dropped is sent once more (on the connection the manager makes anew).
#[derive(Clone)]
pub struct Repeatable(pub ConnectionManager);

impl ConnectionLike for Repeatable {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.0.req_packed_command(cmd).await {
                Err(e) if connection_lost(&e) => self.0.req_packed_command(cmd).await,
                other => other,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match self.0.req_packed_commands(pipeline, offset, count).await {
                Err(e) if connection_lost(&e) => {
                    self.0.req_packed_commands(pipeline, offset, count).await
                }
                other => other,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// A Redis connection made on first use: a part that must not hold up or fail a process's
/// start (the scaler, the shared cache) tries a Redis that is down at start again at its
/// next use.
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

    /// The connection, for commands safe to repeat.
    pub async fn get(&self) -> Result<Repeatable, RedisError> {
        self.conn
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(
                    self.client.clone(),
                    manager_config(Some(RESPONSE_TIMEOUT)),
                )
            })
            .await
            .cloned()
            .map(Repeatable)
    }
}
