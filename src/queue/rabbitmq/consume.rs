//! The receiving side: deliveries read (a group split into its members), a group acked
//! once its last member settles, a message that cannot be read set aside.

use super::*;
use crate::queue::metrics::broker_metrics;

impl Inner {
    /// Counts one member of a group as settled (`requeue`: it could not be, see [`Group`]);
    /// after the last one the message is acked, or requeued whole.
    pub(super) async fn member_done(&self, group: &str, requeue: bool) -> Result<(), QueueError> {
        let done = {
            let mut groups = self.groups.lock().expect("groups lock");
            let Some(g) = groups.get_mut(group) else {
                return Ok(());
            };
            g.requeue |= requeue;
            g.left = g.left.saturating_sub(1);
            if g.left > 0 {
                return Ok(());
            }
            groups.remove(group).expect("present")
        };
        let settled = if done.requeue {
            let back = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            done.acker.nack(back).await
        } else {
            done.acker.ack(BasicAckOptions::default()).await
        };
        settled.map(drop).map_err(backend)
    }

    /// A message that is not a task we can read (a damaged group body, a foreign publisher's
    /// message): moved as it is to the dead-letter queue with the reason, then acked, so it is
    /// neither dropped unseen nor delivered forever. If the move fails it stays unacknowledged
    /// and returns after a reconnect.
    pub(super) async fn set_aside(&self, d: lapin::message::Delivery, body: &[u8], reason: &str) {
        broker_metrics().broker_error("rabbitmq", "malformed");
        tracing::warn!(queue = %self.queue, reason, "a message that is not a task goes to the dead-letter queue");
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        headers.insert("reason".into(), long(reason));
        let priority = d.properties.priority().unwrap_or(0);
        match self.publish_raw(&self.dead, body, priority, headers).await {
            Ok(()) => {
                if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, "acking a message moved to the dead-letter queue failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "moving a message that is not a task failed; it stays unacknowledged")
            }
        }
    }

    /// Our deliveries for one AMQP delivery: one task, or every member of a group.
    pub(super) async fn deliveries(
        &self,
        mut d: lapin::message::Delivery,
        generation: u64,
        out: &mut Vec<Delivery>,
    ) {
        let tag = format!("{generation}:{}", d.delivery_tag);
        let headers = d.properties.headers().clone().unwrap_or_default();
        let priority = d.properties.priority().unwrap_or(0);
        let data = Bytes::from(std::mem::take(&mut d.data));
        let grouped = headers.inner().contains_key("group");
        let members = if grouped {
            decode_group(&data, priority).filter(|m| !m.is_empty())
        } else {
            header(&headers, "task_id").map(|task_id| {
                vec![TaskMessage {
                    task_id,
                    model: header(&headers, "model").unwrap_or_default(),
                    payload: data.clone(),
                    trace: trace_of(&headers),
                    priority,
                }]
            })
        };
        let Some(members) = members else {
            let reason = if grouped {
                "malformed task group"
            } else {
                "no task_id header"
            };
            self.set_aside(d, &data, reason).await;
            return;
        };
        let reclaimed = d.redelivered || header(&headers, "reclaimed").is_some();
        if !grouped {
            self.ackers
                .lock()
                .expect("ackers lock")
                .insert(tag.clone(), d.acker);
            let msg = members.into_iter().next().expect("one member");
            out.push(Delivery {
                msg,
                reclaimed,
                lease_expired: false,
                tag,
            });
            return;
        }
        let group = Group {
            acker: d.acker,
            left: members.len(),
            requeue: false,
        };
        self.groups
            .lock()
            .expect("groups lock")
            .insert(tag.clone(), group);
        for (i, msg) in members.into_iter().enumerate() {
            out.push(Delivery {
                msg,
                reclaimed,
                lease_expired: false,
                tag: format!("{tag}#{i}"),
            });
        }
    }
}
