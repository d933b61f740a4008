//! The broker's metrics (`infergate_task_queue_depth`, `_broker_errors_total`,
//! `_broker_reconnects_total`, `_amqp_group_tasks`): registered in the process's registry on
//! first use ([`broker_metrics`]), which the health part makes at start.

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

use crate::telemetry::metrics::register;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerLabel {
    /// `memory`, `redis` or `rabbitmq`.
    pub broker: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerOpLabels {
    pub broker: &'static str,
    /// `publish`, `receive`, `ack`, `retry`, `dead_letter` or `renew`.
    pub op: &'static str,
}

pub struct BrokerMetrics {
    pub task_queue_depth: Family<BrokerLabel, Gauge>,
    pub broker_errors: Family<BrokerOpLabels, Counter>,
    pub broker_reconnects: Family<BrokerLabel, Counter>,
    /// Tasks per RabbitMQ message published with grouping on (`tasks.amqp_group_max` > 1).
    pub amqp_group_tasks: Histogram,
}

/// This process's broker metrics.
pub fn broker_metrics() -> &'static BrokerMetrics {
    static M: OnceLock<BrokerMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = BrokerMetrics {
            task_queue_depth: Family::default(),
            broker_errors: Family::default(),
            broker_reconnects: Family::default(),
            amqp_group_tasks: Histogram::new([
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        };
        register(
            "task_queue_depth",
            "Task messages waiting or in flight in the broker",
            m.task_queue_depth.clone(),
        );
        register(
            "broker_errors",
            "Failed broker operations, by broker and operation",
            m.broker_errors.clone(),
        );
        register(
            "broker_reconnects",
            "Reconnections to the broker",
            m.broker_reconnects.clone(),
        );
        register(
            "amqp_group_tasks",
            "Tasks per RabbitMQ message published with grouping on",
            m.amqp_group_tasks.clone(),
        );
        m
    })
}

impl BrokerMetrics {
    /// Creates this broker's series at zero, so they are scraped (and `rate()` works) before
    /// the first event.
    pub fn init(&self, broker: &'static str) {
        for op in [
            "publish",
            "receive",
            "ack",
            "retry",
            "dead_letter",
            "malformed",
        ] {
            let _ = self
                .broker_errors
                .get_or_create(&BrokerOpLabels { broker, op });
        }
        let _ = self
            .broker_reconnects
            .get_or_create(&BrokerLabel { broker });
    }

    pub fn broker_error(&self, broker: &'static str, op: &'static str) {
        self.broker_errors
            .get_or_create(&BrokerOpLabels { broker, op })
            .inc();
    }

    pub fn broker_reconnect(&self, broker: &'static str) {
        self.broker_reconnects
            .get_or_create(&BrokerLabel { broker })
            .inc();
    }
}
