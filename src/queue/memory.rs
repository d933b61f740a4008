//! In-process broker: the embedded default, for one `infergate serve` with workers inside.
//! Bounded; a worker task that fails hands its message back with `retry`.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Broker, Delivery, QueueError, TaskMessage};

pub struct MemoryBroker {
    capacity: usize,
    inner: Mutex<Inner>,
    ready: Notify,
}

#[derive(Default)]
struct Inner {
    /// (tag, message, handed back by a worker)
    queue: VecDeque<(u64, TaskMessage, bool)>,
    in_flight: HashMap<u64, TaskMessage>,
    dead: Vec<(TaskMessage, String)>,
    next: u64,
}

impl MemoryBroker {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        {
            let mut inner = self.inner.lock().expect("broker lock");
            let depth = inner.queue.len() + inner.in_flight.len();
            if depth >= self.capacity {
                return Err(QueueError::Full(depth as u64));
            }
            inner.next += 1;
            let n = inner.next;
            inner.queue.push_back((n, msg.clone(), false));
        }
        self.ready.notify_one();
        Ok(())
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.ready.notified();
            {
                let mut inner = self.inner.lock().expect("broker lock");
                let n = max.min(inner.queue.len());
                if n > 0 {
                    let taken: Vec<(u64, TaskMessage, bool)> = inner.queue.drain(..n).collect();
                    let mut out = Vec::with_capacity(n);
                    for (tag, msg, handed_back) in taken {
                        inner.in_flight.insert(tag, msg.clone());
                        out.push(Delivery {
                            msg,
                            reclaimed: handed_back,
                            lease_expired: false,
                            tag: tag.to_string(),
                        });
                    }
                    if !inner.queue.is_empty() {
                        self.ready.notify_one();
                    }
                    return Ok(out);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        let tag: u64 = d.tag.parse().unwrap_or(0);
        self.inner
            .lock()
            .expect("broker lock")
            .in_flight
            .remove(&tag);
        Ok(())
    }

    async fn retry(&self, d: &Delivery) -> Result<(), QueueError> {
        let tag: u64 = d.tag.parse().unwrap_or(0);
        {
            let mut inner = self.inner.lock().expect("broker lock");
            if let Some(msg) = inner.in_flight.remove(&tag) {
                inner.queue.push_back((tag, msg, true));
            }
        }
        self.ready.notify_one();
        Ok(())
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        let tag: u64 = d.tag.parse().unwrap_or(0);
        let mut inner = self.inner.lock().expect("broker lock");
        if let Some(msg) = inner.in_flight.remove(&tag) {
            // Bounded like the queue: the oldest dead letters make room.
            if inner.dead.len() >= self.capacity {
                inner.dead.remove(0);
            }
            inner.dead.push((msg, reason.to_string()));
        }
        Ok(())
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let inner = self.inner.lock().expect("broker lock");
        Ok((inner.queue.len() + inner.in_flight.len()) as u64)
    }

    async fn dead_letters(&self) -> Result<Vec<(TaskMessage, String)>, QueueError> {
        Ok(self.inner.lock().expect("broker lock").dead.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> TaskMessage {
        TaskMessage {
            task_id: id.into(),
            model: "m".into(),
            payload: bytes::Bytes::new(),
            trace: Default::default(),
            priority: 0,
        }
    }

    #[tokio::test]
    async fn bounded_fifo_with_retry_and_dead_letters() {
        let b = MemoryBroker::new(2);
        b.publish(&msg("a")).await.unwrap();
        b.publish(&msg("b")).await.unwrap();
        assert!(matches!(
            b.publish(&msg("c")).await,
            Err(QueueError::Full(2))
        ));
        let got = b.receive(1, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got[0].msg.task_id, "a");
        b.retry(&got[0]).await.unwrap();
        let got = b.receive(5, Duration::from_millis(10)).await.unwrap();
        assert_eq!(
            got.iter()
                .map(|d| d.msg.task_id.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        b.ack(&got[0]).await.unwrap();
        b.dead_letter(&got[1], "poison").await.unwrap();
        assert_eq!(b.depth().await.unwrap(), 0);
        assert_eq!(b.dead_letters().await.unwrap()[0].1, "poison");
        assert!(
            b.receive(1, Duration::from_millis(20))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
