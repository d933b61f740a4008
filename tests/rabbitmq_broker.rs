//! The RabbitMQ broker itself, against the real RabbitMQ on 127.0.0.1:5672:
//! - with grouping on (`tasks.amqp_group_max` > 1), concurrent submissions share messages,
//!   every task comes back exactly once with its own payload and trace, and the members of one
//!   message are acked, handed back and dead-lettered one by one; a member RabbitMQ refuses to
//!   take back alone brings its whole message back;
//! - a message that is not a task is moved to the dead-letter queue, not dropped or redelivered;
//! - a task the dead-letter queue refuses is handed back, not held unacknowledged;
//! - the readiness probe keeps one named connection instead of opening one per probe.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use infergate::{
    queue::{Broker, Delivery, TaskMessage, rabbitmq::RabbitBroker},
    telemetry::trace::TraceHeaders,
};

fn task(i: usize) -> TaskMessage {
    TaskMessage {
        task_id: format!("t{i:03}"),
        model: "add_sub".into(),
        payload: Bytes::from(format!("payload of task {i}").into_bytes()),
        trace: TraceHeaders {
            traceparent: Some(format!("00-{:032x}-00f067aa0ba902b7-01", i + 1)),
            tracestate: None,
        },
        priority: 0,
    }
}

/// Receives until `n` deliveries arrived (or 10 s passed).
async fn receive_n(b: &RabbitBroker, n: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n && Instant::now() < deadline {
        got.extend(
            b.receive(n - got.len(), Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    got
}

/// A member's tag is `<message tag>#<index>`; a lone task's tag has no `#`.
fn group_of(d: &Delivery) -> Option<&str> {
    d.tag.split_once('#').map(|(g, _)| g)
}

/// A broker with grouping on (up to 8 tasks per message) on its own queues.
async fn grouping_broker(prefix: &str) -> RabbitBroker {
    RabbitBroker::connect(RABBIT, prefix, 1_000, 64, 8, Duration::from_secs(10))
        .await
        .unwrap()
}

/// Publishes tasks 0..n all at once, so that they may share messages.
async fn publish_at_once(b: &RabbitBroker, n: usize) {
    let published =
        futures::future::join_all((0..n).map(|i| async move { b.publish(&task(i)).await })).await;
    assert!(published.iter().all(Result::is_ok), "{published:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_submissions_come_back_one_by_one_and_are_settled_one_by_one() {
    let prefix = format!("iggroup-{}", infergate::tasks::new_task_id());
    let b = grouping_broker(&prefix).await;
    let n = 40;
    publish_at_once(&b, n).await;
    // Fewer messages than tasks: submissions that waited for a confirm left together.
    let messages = b.depth().await.unwrap() as usize;
    assert!(
        (n / 8..n).contains(&messages),
        "{messages} messages for {n} tasks"
    );

    // Asked for at most 5 at a time, the consumer hands out members in pieces; each task
    // comes back exactly once, with its own payload and trace.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n && Instant::now() < deadline {
        let part = b.receive(5, Duration::from_millis(200)).await.unwrap();
        assert!(part.len() <= 5);
        got.extend(part);
    }
    let by_id: BTreeMap<String, &Delivery> =
        got.iter().map(|d| (d.msg.task_id.clone(), d)).collect();
    assert_eq!((got.len(), by_id.len()), (n, n), "every task exactly once");
    for i in 0..n {
        assert_eq!(by_id[&task(i).task_id].msg, task(i));
        assert!(!by_id[&task(i).task_id].reclaimed);
    }
    let mut groups: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for d in &got {
        if let Some(g) = group_of(d) {
            groups.entry(g).or_default().push(d);
        }
    }
    let (_, members) = groups
        .iter()
        .max_by_key(|(_, m)| m.len())
        .expect("at least one group");
    assert!(members.len() >= 2);

    // In the largest group: one member is handed back, one dead-lettered, the rest acked.
    let (back, dead) = (members[0].clone(), members[1].clone());
    b.retry(&back).await.unwrap();
    b.dead_letter(&dead, "Triton rejected it").await.unwrap();
    let settled: BTreeSet<&str> = [back.tag.as_str(), dead.tag.as_str()].into();
    for d in got.iter().filter(|d| !settled.contains(d.tag.as_str())) {
        b.ack(d).await.unwrap();
    }
    // The handed-back member returns alone, flagged as reclaimed; nothing else returns.
    let again = receive_n(&b, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].msg, back.msg);
    assert!(again[0].reclaimed);
    assert_eq!(group_of(&again[0]), None);
    assert!(
        b.receive(10, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty()
    );
    b.ack(&again[0]).await.unwrap();
    let dead_letters = b.dead_letters().await.unwrap();
    assert_eq!(dead_letters.len(), 1);
    assert_eq!(dead_letters[0].0, dead.msg);
    assert_eq!(dead_letters[0].1, "Triton rejected it");
    // Every message was acked once all its members were settled: the queue drains to 0.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.depth().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "messages left unacknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_consumer_goes_away_comes_back_whole() {
    let prefix = format!("iggroup-{}", infergate::tasks::new_task_id());
    let producer = grouping_broker(&prefix).await;
    let n = 16;
    publish_at_once(&producer, n).await;
    // A consumer takes everything, settles one member, and disappears (its connection closes).
    {
        let doomed = grouping_broker(&prefix).await;
        let got = receive_n(&doomed, n).await;
        assert_eq!(got.len(), n);
        let member = got
            .iter()
            .find(|d| group_of(d).is_some())
            .expect("a grouped member");
        doomed.ack(member).await.unwrap();
        doomed.close().await;
    }
    // Another consumer gets every task again, the settled member included (its message was
    // not acked), each flagged as reclaimed: the task store decides what still runs.
    let rescuer = grouping_broker(&prefix).await;
    let again = receive_n(&rescuer, n).await;
    let ids: BTreeSet<String> = again.iter().map(|d| d.msg.task_id.clone()).collect();
    assert_eq!((again.len(), ids.len()), (n, n));
    assert!(again.iter().all(|d| d.reclaimed));
    for d in &again {
        rescuer.ack(d).await.unwrap();
    }
}

/// RabbitMQ's own list of the connections whose client-given name is `name`: one line each,
/// with the connection's ports and the time it was opened.
fn connections_named(name: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "--quiet", "--no-table-headers"])
        .args(["name", "connected_at", "client_properties"])
        .output()
        .expect("rabbitmqctl (installed with RabbitMQ by scripts/ensure-services.sh)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("\"{name}\"")))
        .map(|l| l.split('\t').take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_probe_reuses_one_named_connection() {
    let prefix = format!("igprobe-{}", infergate::tasks::new_task_id());
    let b = RabbitBroker::connect(RABBIT, &prefix, 1_000, 8, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let name = format!("infergate probe {prefix}.tasks");
    b.publish(&task(0)).await.unwrap();
    for _ in 0..5 {
        assert_eq!(b.depth().await.unwrap(), 1);
    }
    let first = connections_named(&name);
    assert_eq!(first.len(), 1, "{first:?}");
    for _ in 0..5 {
        assert_eq!(b.depth().await.unwrap(), 1);
    }
    // The same connection (same ports, same opening time), not one per probe.
    assert_eq!(connections_named(&name), first);
    // The publishing connection is named as well.
    assert_eq!(
        connections_named(&format!("infergate publish {prefix}.tasks")).len(),
        1
    );
    b.close().await;
    assert!(connections_named(&name).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_cannot_be_handed_back_alone_brings_its_whole_message_back() {
    let prefix = format!("iggroup-{}", infergate::tasks::new_task_id());
    let capacity = 20;
    // Prefetch 1: the consumer holds one message at a time and the rest stay ready.
    let consumer = RabbitBroker::connect(RABBIT, &prefix, capacity, 1, 8, Duration::from_secs(10))
        .await
        .unwrap();
    publish_at_once(&consumer, 16).await;
    // Take messages one by one (acking lone tasks) until one is a group.
    let mut members = Vec::new();
    for _ in 0..16 {
        let got = consumer.receive(64, Duration::from_secs(2)).await.unwrap();
        if got.first().and_then(group_of).is_some() {
            members = got;
            break;
        }
        for d in &got {
            consumer.ack(d).await.unwrap();
        }
    }
    assert!(
        members.len() >= 2,
        "no group among 16 concurrent submissions"
    );
    // Fill the queue to its bound: RabbitMQ now refuses publishes (reject-publish).
    let filler = RabbitBroker::connect(RABBIT, &prefix, capacity, 1, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut fillers = 0;
    loop {
        match filler.publish(&task(100 + fillers)).await {
            Ok(()) => fillers += 1,
            Err(infergate::queue::QueueError::Full(_)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(fillers <= capacity as usize, "the queue never filled");
    }
    // The first member cannot be republished alone; the broker takes that in hand (no
    // error for the worker) and the others are acked as usual.
    consumer.retry(&members[0]).await.unwrap();
    for d in &members[1..] {
        consumer.ack(d).await.unwrap();
    }
    // The whole message comes back (not lost, not stuck unacknowledged): every member again,
    // flagged as reclaimed, so the task store can skip those that finished.
    let mut drained = Vec::new();
    loop {
        let got = consumer.receive(64, Duration::from_secs(1)).await.unwrap();
        if got.is_empty() {
            break;
        }
        for d in &got {
            consumer.ack(d).await.unwrap();
        }
        drained.extend(got);
        assert!(drained.len() <= 64, "{} deliveries", drained.len());
    }
    let ids: Vec<&str> = drained.iter().map(|d| d.msg.task_id.as_str()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "each message once: {ids:?}");
    for m in &members {
        let again = drained
            .iter()
            .find(|d| d.msg == m.msg)
            .unwrap_or_else(|| panic!("{} did not come back", m.msg.task_id));
        assert!(again.reclaimed && group_of(again).is_some());
    }
    for i in 0..fillers {
        assert!(unique.contains(task(100 + i).task_id.as_str()));
    }
    assert_eq!(consumer.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_a_task_is_moved_to_the_dead_letter_queue() {
    use lapin::{
        BasicProperties, Connection, ConnectionProperties,
        options::BasicPublishOptions,
        types::{AMQPValue, FieldTable, ShortString},
    };
    let prefix = format!("igforeign-{}", infergate::tasks::new_task_id());
    let b = grouping_broker(&prefix).await;
    assert_eq!(b.depth().await.unwrap(), 0, "queues declared");
    // Two messages infergate did not write: a cut group body and a body with no task header.
    let conn = Connection::connect(RABBIT, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut group = FieldTable::default();
    group.insert("group".into(), AMQPValue::LongUInt(2));
    for (body, headers) in [
        (&b"IGG1\0\0"[..], group),
        (&b"hello"[..], FieldTable::default()),
    ] {
        ch.basic_publish(
            ShortString::from(""),
            ShortString::from(format!("{prefix}.tasks")),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let _ = conn.close(200, "".into()).await;
    b.publish(&task(0)).await.unwrap();
    // Only the real task is handed out; the two others end up as dead letters, bodies intact.
    let got = receive_n(&b, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, task(0));
    assert!(
        b.receive(10, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty()
    );
    b.ack(&got[0]).await.unwrap();
    let mut dead: Vec<(Vec<u8>, String)> = b
        .dead_letters()
        .await
        .unwrap()
        .into_iter()
        .map(|(m, reason)| (m.payload.to_vec(), reason))
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            (b"IGG1\0\0".to_vec(), "malformed task group".to_string()),
            (b"hello".to_vec(), "no task_id header".to_string()),
        ]
    );
    assert_eq!(b.depth().await.unwrap(), 0);
}

/// A RabbitMQ policy for the test's dead-letter queue, cleared on drop.
struct Policy(String);

impl Policy {
    fn set(name: &str, pattern: &str, definition: &str) -> Self {
        let out = std::process::Command::new("rabbitmqctl")
            .args([
                "set_policy",
                "--apply-to",
                "queues",
                name,
                pattern,
                definition,
            ])
            .output()
            .expect("rabbitmqctl");
        assert!(out.status.success(), "{out:?}");
        Self(name.to_string())
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_dead_letter_queue_refuses_goes_back_instead_of_hanging() {
    let prefix = format!("igdead-{}", infergate::tasks::new_task_id());
    // A policy makes the dead-letter queue refuse publishes once it holds 2 messages, so
    // dead-lettering fails the way it does on a broker that refuses them.
    let _policy = Policy::set(
        &prefix,
        &format!("^{prefix}\\.tasks\\.dead$"),
        r#"{"overflow":"reject-publish","max-length":2}"#,
    );
    let plain = RabbitBroker::connect(RABBIT, &prefix, 1_000, 64, 1, Duration::from_secs(10))
        .await
        .unwrap();
    for i in 0..2 {
        plain.publish(&task(i)).await.unwrap();
    }
    for d in receive_n(&plain, 2).await {
        plain.dead_letter(&d, "full up").await.unwrap();
    }
    // A lone task: the error is reported and the message is handed back, not held.
    plain.publish(&task(2)).await.unwrap();
    let got = receive_n(&plain, 1).await;
    let err = plain.dead_letter(&got[0], "no room").await.unwrap_err();
    assert!(
        matches!(err, infergate::queue::QueueError::Full(_)),
        "{err}"
    );
    let again = receive_n(&plain, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].msg, task(2));
    assert!(again[0].reclaimed);
    plain.ack(&again[0]).await.unwrap();
    plain.close().await;

    // A grouped member: its message comes back whole once the other members are acked.
    let grouping = grouping_broker(&prefix).await;
    publish_at_once(&grouping, 16).await;
    let got = receive_n(&grouping, 16).await;
    let group = got.iter().find_map(group_of).expect("a group").to_string();
    let members: Vec<&Delivery> = got
        .iter()
        .filter(|d| group_of(d) == Some(group.as_str()))
        .collect();
    assert!(grouping.dead_letter(members[0], "no room").await.is_err());
    for d in &got[..] {
        if d.tag != members[0].tag {
            grouping.ack(d).await.unwrap();
        }
    }
    let back = receive_n(&grouping, members.len()).await;
    let want: BTreeSet<&str> = members.iter().map(|d| d.msg.task_id.as_str()).collect();
    let came: BTreeSet<&str> = back.iter().map(|d| d.msg.task_id.as_str()).collect();
    assert_eq!(came, want);
    assert!(back.iter().all(|d| d.reclaimed));
    for d in &back {
        grouping.ack(d).await.unwrap();
    }
    assert_eq!(grouping.depth().await.unwrap(), 0);
}
