//! The async path's parts, connected once per process and shared by the front end's task API,
//! the workers and the upkeep: the task store, the broker, the dead letters, the claim
//! check's blobs and the webhooks.

use std::{sync::Arc, time::Duration};

use anyhow::Context;

use super::{
    TaskStore,
    blobs::Blobs,
    config::{BrokerUrl, StoreUrl, TasksConfig},
    dead::{DeadLetterStore, memory::MemoryDeadLetters, redis::RedisDeadLetters},
    memory::MemoryTaskStore,
    outbox_grace,
    redis::RedisTaskStore,
    webhooks::{self, Webhooks, WebhooksConfig},
};
use crate::{
    auth::ApiKey,
    queue::{Broker, memory::MemoryBroker, rabbitmq::RabbitBroker, redis::RedisBroker},
};

/// The async path's parts, held alike by the front ([`super::front::TaskFront`]) and the
/// worker: the task store, broker and dead letters named by the config, connected.
#[derive(Clone)]
pub struct Tasks {
    pub store: Arc<dyn TaskStore>,
    pub broker: Arc<dyn Broker>,
    /// Kept where the task store is (in process, or in its Redis).
    pub dead: Arc<dyn DeadLetterStore>,
    /// The blob store, when `tasks.blob_store` names one: the claim check's (already wrapped
    /// around `store` and `broker`), swept by the upkeep, and where the Batch API keeps files.
    pub blobs: Option<Arc<Blobs>>,
    /// Completion webhooks, sent by whichever process finishes a task.
    pub webhooks: Arc<Webhooks>,
    /// `memory`, `redis` or `rabbitmq`, for metric labels.
    pub broker_kind: &'static str,
}

impl Tasks {
    pub async fn connect(
        t: &TasksConfig,
        hooks: &WebhooksConfig,
        keys: &[ApiKey],
    ) -> anyhow::Result<Self> {
        let ttl = Duration::from_millis(t.ttl_ms);
        let grace = outbox_grace(Duration::from_millis(t.publish_timeout_ms));
        let recheck = Duration::from_millis(t.outbox_recheck_ms);
        let store: Arc<dyn TaskStore> = match &t.task_store {
            StoreUrl::Memory => Arc::new(
                MemoryTaskStore::new(ttl, t.queue_capacity as usize * 2, t.max_result_bytes)
                    .with_outbox(grace, recheck),
            ),
            StoreUrl::Redis(url) => Arc::new(
                RedisTaskStore::connect(url, &t.redis_prefix, ttl, t.max_result_bytes)
                    .await
                    .with_context(|| format!("connecting the task store {url}"))?
                    .with_webhook_hold(webhooks::hold(hooks))
                    .with_outbox(grace, recheck),
            ),
        };
        let broker: Arc<dyn Broker> = match &t.broker {
            BrokerUrl::Memory => Arc::new(MemoryBroker::new(t.queue_capacity as usize)),
            BrokerUrl::RabbitMq(url) => {
                let prefetch = (t.worker_concurrency * 2).min(u16::MAX as usize) as u16;
                Arc::new(
                    RabbitBroker::connect(
                        url,
                        &t.redis_prefix,
                        t.queue_capacity,
                        prefetch,
                        t.amqp_group_max,
                        Duration::from_millis(t.publish_timeout_ms),
                    )
                    .await
                    .with_context(|| format!("connecting the broker {url}"))?,
                )
            }
            BrokerUrl::Redis(url) => {
                let consumer = format!("worker-{}-{}", std::process::id(), super::new_task_id());
                Arc::new(
                    RedisBroker::connect(
                        url,
                        &t.redis_prefix,
                        &consumer,
                        t.queue_capacity,
                        Duration::from_millis(t.visibility_timeout_ms),
                    )
                    .await
                    .with_context(|| format!("connecting the broker {url}"))?,
                )
            }
        };
        let dead: Arc<dyn DeadLetterStore> = match &t.task_store {
            StoreUrl::Memory => Arc::new(MemoryDeadLetters::new(
                t.dead_letter_max,
                t.dead_letter_ttl_ms,
            )),
            StoreUrl::Redis(url) => Arc::new(
                RedisDeadLetters::connect(
                    url,
                    &t.redis_prefix,
                    t.dead_letter_max,
                    t.dead_letter_ttl_ms,
                )
                .await
                .with_context(|| format!("connecting the dead letters' store {url}"))?,
            ),
        };
        let blobs = match &t.blob_store {
            Some(url) => Some(Arc::new(
                Blobs::open(url, t.claim_check_bytes)
                    .map_err(|e| anyhow::anyhow!("tasks.blob_store: {e}"))?,
            )),
            None => None,
        };
        // With a blob store, the store and broker take and give whole payloads and keep the
        // large ones there (the claim check): neither the front nor the worker sees blobs.
        let (store, broker) = match &blobs {
            Some(b) => super::claim::decorate(store, broker, Arc::clone(b)),
            None => (store, broker),
        };
        let webhooks = Arc::new(Webhooks::new(hooks, keys, Arc::clone(&store)));
        Ok(Self {
            store,
            broker,
            dead,
            blobs,
            webhooks,
            broker_kind: t.broker.kind(),
        })
    }
}
