//! The task store contract, run the same way against the in-memory store and the Redis store
//! (the real Redis on 127.0.0.1:6379, a fresh key prefix per run): a worker's start is one
//! atomic step that counts attempts and respects reclaims, state changes answer with the
//! record they left (the worker's quiet ones with only the outcome), and a poll reads the
//! record and its result together; a failed task is replayed under its id. The dead letters'
//! contract (bounds, filters, read back whole) for both stores. The Redis store's webhook
//! outbox (owed deliveries handed over only when their holder's hold ends). Also the Redis
//! stream broker's bound and its handling of entries that are not tasks.

mod common;

use std::time::Duration;

use bytes::Bytes;
use infergate::{
    queue::{Broker, QueueError, TaskMessage, redis::RedisBroker},
    tasks::{
        Change, Kept, Start, StoreError, Takeover, TaskError, TaskRecord, TaskState, TaskStore,
        dead::{
            DeadDepth, DeadEntry, DeadFilter, DeadLetter, DeadLetterStore,
            memory::MemoryDeadLetters, redis::RedisDeadLetters,
        },
        memory::MemoryTaskStore,
        new_task_id,
        redis::RedisTaskStore,
    },
};

fn rec(id: &str) -> TaskRecord {
    TaskRecord::new(id.to_string(), "tenant", "add_sub", "", None)
}

fn message(id: &str) -> TaskMessage {
    TaskMessage {
        task_id: id.to_string(),
        model: "add_sub".into(),
        payload: Bytes::from(format!("payload of {id}")),
        trace: infergate::telemetry::trace::TraceHeaders {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
        },
        priority: 7,
    }
}

/// The transactional outbox: a task created with its message keeps it until `published`;
/// past the grace a claimer gets it (and holds it); a started task leaves the outbox; a
/// withdrawal removes only a task no worker started.
async fn outbox_contract(s: &dyn TaskStore, grace: Duration) {
    let hold = Duration::from_secs(60);
    // Entries of earlier runs (the Redis prefix is fresh, so only this run's) are claimed first.
    let (a, b, c) = (new_task_id(), new_task_id(), new_task_id());
    for id in [&a, &b, &c] {
        assert!(
            s.create(rec(id), 0, Some(&mut message(id)))
                .await
                .unwrap()
                .1
        );
    }
    assert_eq!(s.unpublished(&a).await.unwrap(), Some(message(&a)));
    assert!(
        s.claim_unpublished(10, hold, false)
            .await
            .unwrap()
            .is_empty(),
        "a submitter's own publish is not raced"
    );
    s.published(&a).await.unwrap();
    assert_eq!(s.unpublished(&a).await.unwrap(), None);
    // b's worker starts it (its publish was confirmed to nobody): it leaves the outbox.
    assert!(matches!(
        s.start(&b, false, 3).await.unwrap(),
        Start::Started(_)
    ));
    assert_eq!(s.unpublished(&b).await.unwrap(), None);
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    assert_eq!(
        s.claim_unpublished(10, hold, false).await.unwrap(),
        vec![message(&c)],
        "only the never-confirmed, never-started task is relayed"
    );
    assert!(
        s.claim_unpublished(10, hold, false)
            .await
            .unwrap()
            .is_empty(),
        "a claim holds it"
    );
    // Withdrawn: a started task stands, a queued one is forgotten (and its key with it).
    assert!(!s.withdraw(&b).await.unwrap());
    assert!(s.get(&b).await.unwrap().is_some());
    assert!(s.withdraw(&c).await.unwrap());
    assert_eq!(s.get(&c).await.unwrap(), None);
    assert_eq!(s.unpublished(&c).await.unwrap(), None);
    // An idempotent retry finds the earlier task and its unconfirmed message.
    let keyed = |id: &str| TaskRecord::new(id.into(), "tenant", "add_sub", "", Some(c.clone()));
    let d = new_task_id();
    assert!(
        s.create(keyed(&d), 0, Some(&mut message(&d)))
            .await
            .unwrap()
            .1
    );
    let (again, created) = s
        .create(keyed(&new_task_id()), 0, Some(&mut message("other")))
        .await
        .unwrap();
    assert_eq!((again.id.as_str(), created), (d.as_str(), false));
    assert_eq!(s.unpublished(&d).await.unwrap(), Some(message(&d)));
}

/// A delivery whose lease ran out takes over a running attempt only if that attempt is at
/// least one lease old: a younger one belongs to another, live delivery of the task.
async fn takeover_contract(s: &dyn TaskStore) {
    let a = new_task_id();
    s.create(rec(&a), 0, None).await.unwrap();
    assert!(matches!(
        s.start(&a, false, 5).await.unwrap(),
        Start::Started(_)
    ));
    let stale = s
        .start_many(&[(&a, Takeover::AfterLease(Duration::from_secs(60)))], 5)
        .await;
    assert_eq!(stale, vec![Ok(Start::Skip)], "a stale duplicate is skipped");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = s
        .start_many(&[(&a, Takeover::AfterLease(Duration::from_millis(10)))], 5)
        .await;
    assert!(
        matches!(&late[..], [Ok(Start::Started(r))] if r.attempts == 2),
        "an attempt older than the lease is taken over: {late:?}"
    );
    let handed = s.start_many(&[(&a, Takeover::Yes)], 5).await;
    assert!(
        matches!(&handed[..], [Ok(Start::Started(r))] if r.attempts == 3),
        "a hand-back takes over at once: {handed:?}"
    );
}

#[tokio::test]
async fn both_stores_skip_stale_duplicates() {
    takeover_contract(&MemoryTaskStore::new(Duration::from_secs(60), 100, 1024)).await;
    let prefix = format!("igtest-{}", new_task_id());
    let s = RedisTaskStore::connect(common::REDIS, &prefix, Duration::from_secs(60), 1024)
        .await
        .unwrap();
    takeover_contract(&s).await;
}

#[tokio::test]
async fn the_memory_store_keeps_the_outbox_contract() {
    let grace = Duration::from_millis(300);
    let s = MemoryTaskStore::new(Duration::from_secs(60), 100, 1024)
        .with_outbox(grace, Duration::from_secs(60));
    outbox_contract(&s, grace).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_outbox_contract() {
    let grace = Duration::from_millis(300);
    let prefix = format!("igtest-{}", new_task_id());
    let s = RedisTaskStore::connect(common::REDIS, &prefix, Duration::from_secs(60), 1024)
        .await
        .unwrap()
        .with_outbox(grace, Duration::from_secs(60));
    outbox_contract(&s, grace).await;
}

/// A refused transition names the state it found and the one asked for.
fn assert_conflict(err: &StoreError, found: TaskState, asked: TaskState) {
    assert!(
        matches!(err, StoreError::Conflict { from, to, .. } if *from == found && *to == asked),
        "{err:?}"
    );
}

fn with_error(error: &TaskError) -> Change {
    Change {
        error: Some(error.clone()),
        ..Default::default()
    }
}

async fn contract(s: &dyn TaskStore) {
    let a = new_task_id();
    s.create(rec(&a), 0, None).await.unwrap();

    // Unknown tasks are skipped, not errors: the worker acks their messages.
    assert_eq!(
        s.start("no-such-task", false, 3).await.unwrap(),
        Start::Skip
    );

    let Start::Started(r) = s.start(&a, false, 3).await.unwrap() else {
        panic!("a queued task starts")
    };
    assert_eq!((r.state, r.attempts), (TaskState::Running, 1));
    assert!(r.started_at_ms.is_some());
    // Running elsewhere: a plain delivery skips it, a reclaimed one takes it over.
    assert_eq!(s.start(&a, false, 3).await.unwrap(), Start::Skip);
    let Start::Started(r) = s.start(&a, true, 3).await.unwrap() else {
        panic!("a reclaimed delivery restarts a running task")
    };
    assert_eq!(r.attempts, 2);
    // The first attempt's worker, late: its result and its failure are refused (fenced by
    // its attempt number), quiet or not, and change nothing.
    for quiet in [false, true] {
        let late = Change {
            result: Some(Bytes::from_static(b"stale")),
            fence: Some(1),
            ..Default::default()
        };
        let err = if quiet {
            s.transition_quiet(&a, TaskState::Succeeded, late)
                .await
                .unwrap_err()
        } else {
            s.transition(&a, TaskState::Succeeded, late)
                .await
                .map(drop)
                .unwrap_err()
        };
        assert!(
            matches!(
                err,
                StoreError::Fenced {
                    fence: 1,
                    current: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(s.get(&a).await.unwrap().unwrap().state, TaskState::Running);

    // A transition answers with the record as it left it.
    let done = s
        .transition(
            &a,
            TaskState::Succeeded,
            Change {
                result: Some(Bytes::from_static(b"the response")),
                fence: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((done.state, done.attempts), (TaskState::Succeeded, 2));
    // Its history: the attempt whose worker never answered, then the one that succeeded.
    let outcomes: Vec<(u32, &str)> = done
        .history
        .iter()
        .map(|h| (h.attempt, h.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, [(1, "worker lost"), (2, "succeeded")]);
    assert!(
        done.history
            .iter()
            .all(|h| h.ended_at_ms >= h.started_at_ms && h.started_at_ms > 0)
    );
    assert!(done.finished_at_ms.is_some());
    assert_eq!(done.tenant, "tenant");
    let (got, result) = s.get_with_result(&a).await.unwrap().unwrap();
    assert_eq!(got, done);
    assert_eq!(result.as_deref(), Some(&b"the response"[..]));
    assert_eq!(s.get(&a).await.unwrap(), Some(done));
    // Final is final: no restart, even reclaimed, and no late overwrite.
    assert_eq!(s.start(&a, true, 3).await.unwrap(), Start::Skip);
    let err = s
        .transition(&a, TaskState::Failed, Change::default())
        .await
        .unwrap_err();
    assert_conflict(&err, TaskState::Succeeded, TaskState::Failed);

    // Attempts used up: the record comes back unchanged, with its last error.
    let b = new_task_id();
    s.create(rec(&b), 0, None).await.unwrap();
    assert!(matches!(
        s.start(&b, false, 1).await.unwrap(),
        Start::Started(_)
    ));
    let error = TaskError {
        code: "Unavailable".into(),
        message: "triton went away".into(),
    };
    let back = s
        .transition(&b, TaskState::Queued, with_error(&error))
        .await
        .unwrap();
    assert_eq!(back.state, TaskState::Queued);
    let Start::Exhausted(r) = s.start(&b, false, 1).await.unwrap() else {
        panic!("one attempt allowed, one made")
    };
    assert_eq!((r.state, r.attempts), (TaskState::Queued, 1));
    assert_eq!(r.error, Some(error.clone()));
    assert_eq!(r.history.len(), 1);
    assert_eq!(
        (
            r.history[0].outcome.as_str(),
            r.history[0].error_message.as_deref()
        ),
        ("retried", Some("triton went away"))
    );
    let (r, result) = s.get_with_result(&b).await.unwrap().unwrap();
    assert_eq!((r.state, result), (TaskState::Queued, None));

    assert!(matches!(
        s.transition("no-such-task", TaskState::Cancelled, Change::default())
            .await
            .unwrap_err(),
        StoreError::NotFound(_)
    ));
    assert_eq!(s.get_with_result("no-such-task").await.unwrap(), None);

    // The quiet transition (the worker's) writes the same, answers nothing but the outcome,
    // and refuses what `transition` refuses, naming the state it found.
    let c = new_task_id();
    s.create(rec(&c), 0, None).await.unwrap();
    assert!(matches!(
        s.start(&c, false, 3).await.unwrap(),
        Start::Started(_)
    ));
    s.transition_quiet(&c, TaskState::Failed, with_error(&error))
        .await
        .unwrap();
    let (r, result) = s.get_with_result(&c).await.unwrap().unwrap();
    assert_eq!(
        (r.state, r.error, result),
        (TaskState::Failed, Some(error), None)
    );
    assert!(r.finished_at_ms.is_some());
    let err = s
        .transition_quiet(&c, TaskState::Succeeded, Change::default())
        .await
        .unwrap_err();
    assert_conflict(&err, TaskState::Failed, TaskState::Succeeded);
    assert!(matches!(
        s.transition_quiet("no-such-task", TaskState::Cancelled, Change::default())
            .await
            .unwrap_err(),
        StoreError::NotFound(_)
    ));

    // A replay queues the failed task again under its id: attempts from 0, the error gone,
    // the history kept with a `replayed` mark; it runs and its new attempts follow.
    let failed = s.get(&c).await.unwrap().unwrap();
    let q = s.requeue(&failed, &message(&c)).await.unwrap();
    assert_eq!(
        (q.state, q.attempts, q.error.clone()),
        (TaskState::Queued, 0, None)
    );
    let stored = s.get(&c).await.unwrap().unwrap();
    assert_eq!(stored, q, "the store holds what requeue answered");
    let outcomes =
        |r: &TaskRecord| -> Vec<String> { r.history.iter().map(|a| a.outcome.clone()).collect() };
    assert_eq!(outcomes(&stored), ["failed", "replayed"]);
    let err = s.requeue(&failed, &message(&c)).await.unwrap_err();
    assert_conflict(&err, TaskState::Queued, TaskState::Queued);
    let Start::Started(r) = s.start(&c, false, 1).await.unwrap() else {
        panic!("a replayed task starts with its attempts reset")
    };
    assert_eq!(r.attempts, 1);
    s.transition_quiet(
        &c,
        TaskState::Succeeded,
        Change {
            fence: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let done = s.get(&c).await.unwrap().unwrap();
    assert_eq!(outcomes(&done), ["failed", "replayed", "succeeded"]);
    // A dead letter's copy of a record that expired meanwhile is written back whole.
    let mut gone = failed.clone();
    gone.id = new_task_id();
    let q = s.requeue(&gone, &message(&gone.id)).await.unwrap();
    assert_eq!(s.get(&gone.id).await.unwrap(), Some(q));
}

fn dead_letter(id: &str, tenant: &str, model: &str, at: u64) -> DeadLetter {
    let mut record = TaskRecord::new(id.to_string(), tenant, model, "", None);
    record.state = TaskState::Failed;
    record.attempts = 2;
    record.queued_at_ms = at - 1;
    DeadLetter {
        entry: DeadEntry {
            record,
            reason: format!("ABORTED: {id} failed"),
            dead_at_ms: at,
            payload_bytes: 3,
        },
        message: TaskMessage {
            task_id: id.to_string(),
            model: model.to_string(),
            payload: Bytes::from_static(b"\x00\xffz"),
            trace: infergate::telemetry::trace::TraceHeaders {
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                tracestate: None,
            },
            priority: 7,
        },
    }
}

/// Dead letters: bounded by count (oldest dropped, counted) and age, filtered by model, tenant
/// and time, read back with their message whole, removed once.
async fn dead_contract(d: &dyn DeadLetterStore) {
    let now = infergate::tasks::now_ms();
    // Max 4 entries: the fifth drops the oldest.
    for (i, (tenant, model)) in [
        ("a", "m1"),
        ("a", "m2"),
        ("b", "m1"),
        ("b", "m2"),
        ("a", "m1"),
    ]
    .into_iter()
    .enumerate()
    {
        let depth = d
            .bury(dead_letter(&format!("t{i}"), tenant, model, now + i as u64))
            .await
            .unwrap();
        assert_eq!(depth.depth, (i as u64 + 1).min(4));
    }
    assert_eq!(
        d.depth().await.unwrap(),
        DeadDepth {
            depth: 4,
            dropped: 1
        }
    );
    assert_eq!(d.get("t0").await.unwrap(), None, "the oldest went first");
    let ids =
        |list: Vec<DeadEntry>| -> Vec<String> { list.into_iter().map(|e| e.record.id).collect() };
    let all = d.list(&DeadFilter::default()).await.unwrap();
    assert_eq!(ids(all), ["t1", "t2", "t3", "t4"], "oldest first");
    let f = DeadFilter {
        model: Some("m1".into()),
        ..Default::default()
    };
    assert_eq!(ids(d.list(&f).await.unwrap()), ["t2", "t4"]);
    let f = DeadFilter {
        tenant: Some("b".into()),
        ..Default::default()
    };
    assert_eq!(ids(d.list(&f).await.unwrap()), ["t2", "t3"]);
    let f = DeadFilter {
        since_ms: Some(now + 2),
        until_ms: Some(now + 4),
        ..Default::default()
    };
    assert_eq!(ids(d.list(&f).await.unwrap()), ["t2", "t3"]);
    let f = DeadFilter {
        limit: Some(1),
        ..Default::default()
    };
    assert_eq!(ids(d.list(&f).await.unwrap()), ["t1"]);
    assert_eq!(
        d.get("t3").await.unwrap(),
        Some(dead_letter("t3", "b", "m2", now + 3))
    );
    assert!(d.remove("t3").await.unwrap());
    assert!(!d.remove("t3").await.unwrap(), "removed once");
    assert_eq!(
        d.depth().await.unwrap(),
        DeadDepth {
            depth: 3,
            dropped: 1
        }
    );
    // Older than the age bound (one minute): dropped at the next entry, counted too.
    d.bury(dead_letter("old", "a", "m1", now - 120_000))
        .await
        .unwrap();
    assert_eq!(d.get("old").await.unwrap(), None);
    assert_eq!(
        d.depth().await.unwrap(),
        DeadDepth {
            depth: 3,
            dropped: 2
        }
    );
}

#[tokio::test]
async fn memory_dead_letters_keep_the_contract() {
    dead_contract(&MemoryDeadLetters::new(4, 60_000)).await;
}

#[tokio::test]
async fn redis_dead_letters_keep_the_contract() {
    let prefix = format!("igtest-{}", new_task_id());
    let d = RedisDeadLetters::connect(common::REDIS, &prefix, 4, 60_000)
        .await
        .unwrap();
    dead_contract(&d).await;
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    contract(&MemoryTaskStore::new(Duration::from_secs(60), 100, 1024)).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract() {
    let prefix = format!("igtest-{}", new_task_id());
    let s = RedisTaskStore::connect(common::REDIS, &prefix, Duration::from_secs(60), 1024)
        .await
        .unwrap();
    contract(&s).await;
}

#[tokio::test]
async fn the_redis_stream_refuses_publishing_past_its_capacity() {
    let prefix = format!("igtest-{}", new_task_id());
    let b = RedisBroker::connect(common::REDIS, &prefix, "c1", 3, Duration::from_secs(30))
        .await
        .unwrap();
    let msg = |i: usize| TaskMessage {
        task_id: format!("t{i}"),
        model: "add_sub".into(),
        payload: Bytes::from(vec![i as u8; 16]),
        trace: Default::default(),
        priority: 4,
    };
    for i in 0..3 {
        b.publish(&msg(i)).await.unwrap();
    }
    let err = b.publish(&msg(3)).await.unwrap_err();
    assert!(matches!(err, QueueError::Full(3)), "{err:?}");
    // Taking and acking one entry makes room for exactly one more.
    let got = b.receive(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, msg(0));
    assert_eq!(b.depth().await.unwrap(), 3, "in flight still counts");
    b.ack(&got[0]).await.unwrap();
    assert_eq!(b.depth().await.unwrap(), 2);
    b.publish(&msg(4)).await.unwrap();
    assert!(matches!(b.publish(&msg(5)).await, Err(QueueError::Full(3))));
    let rest = b.receive(10, Duration::from_millis(100)).await.unwrap();
    let ids: Vec<_> = rest.iter().map(|d| d.msg.task_id.as_str()).collect();
    assert_eq!(ids, ["t1", "t2", "t4"]);
}

#[tokio::test]
async fn a_stream_entry_that_is_not_a_task_is_moved_to_the_dead_letter_stream() {
    let prefix = format!("igtest-{}", new_task_id());
    let b = RedisBroker::connect(common::REDIS, &prefix, "c1", 100, Duration::from_secs(30))
        .await
        .unwrap();
    // An entry infergate did not write (no task_id, no payload), then a real task.
    let mut c = redis::Client::open(common::REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let foreign: String = redis::cmd("XADD")
        .arg(format!("{prefix}:tasks"))
        .arg("*")
        .arg("hello")
        .arg("world")
        .query_async(&mut c)
        .await
        .unwrap();
    let task = TaskMessage {
        task_id: "t0".into(),
        model: "add_sub".into(),
        payload: Bytes::from_static(b"payload"),
        trace: Default::default(),
        priority: 0,
    };
    b.publish(&task).await.unwrap();
    // Only the task is handed out; the other entry leaves the stream for the dead letters,
    // with its reason, its id and its own fields.
    let got = b.receive(10, Duration::from_millis(500)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, task);
    b.ack(&got[0]).await.unwrap();
    assert_eq!(b.depth().await.unwrap(), 0);
    let dead = b.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].0.task_id.as_str(), dead[0].1.as_str()),
        ("", "malformed entry")
    );
    let kept: Vec<Vec<String>> = redis::cmd("XRANGE")
        .arg(format!("{prefix}:tasks:dead"))
        .arg("-")
        .arg("+")
        .query_async::<Vec<(String, Vec<String>)>>(&mut c)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    assert_eq!(
        kept,
        [vec![
            "reason",
            "malformed entry",
            "entry_id",
            &foreign,
            "hello",
            "world"
        ]]
    );
}

/// The Redis store's webhook outbox: a task with a callback enters it atomically with its
/// final state, held by the finishing process; claimable only once the hold runs out; a
/// claim holds it again; an ended delivery takes it out; a task without a callback, or one
/// replayed meanwhile, never comes back from a claim.
#[tokio::test]
async fn the_redis_outbox_hands_over_owed_webhooks_only_when_their_hold_ends() {
    use infergate::tasks::WebhookStatus;
    let prefix = format!("igtest-{}", new_task_id());
    let hold = Duration::from_millis(600);
    let s = RedisTaskStore::connect(common::REDIS, &prefix, Duration::from_secs(60), 1024)
        .await
        .unwrap()
        .with_webhook_hold(hold);
    assert!(s.keeps_outbox());
    let finish = |id: String, to: TaskState, callback: bool| {
        let s = &s;
        async move {
            let mut r = rec(&id);
            if callback {
                r.callback_url = Some("http://127.0.0.1:9/cb".into());
            }
            s.create(r, 0, None).await.unwrap();
            assert!(matches!(
                s.start(&id, false, 3).await.unwrap(),
                Start::Started(_)
            ));
            s.transition(&id, to, Change::default()).await.unwrap();
        }
    };
    let (owed, plain, failed) = (new_task_id(), new_task_id(), new_task_id());
    finish(owed.clone(), TaskState::Succeeded, true).await;
    finish(plain.clone(), TaskState::Succeeded, false).await;
    finish(failed.clone(), TaskState::Failed, true).await;
    assert!(
        s.claim_webhooks(10).await.unwrap().is_empty(),
        "the finishing process holds them"
    );
    tokio::time::sleep(hold + Duration::from_millis(200)).await;
    let mut got = s.claim_webhooks(10).await.unwrap();
    got.sort();
    let mut want = vec![owed.clone(), failed.clone()];
    want.sort();
    assert_eq!(got, want, "both owed, and only they");
    assert!(
        s.claim_webhooks(10).await.unwrap().is_empty(),
        "a claim holds them again"
    );
    // One ends; the other is renewed as pending, then its holder stops.
    let status = |state: &str| WebhookStatus {
        state: state.into(),
        id: "x".into(),
        attempts: 1,
        last_status: None,
        last_error: None,
        updated_at_ms: 0,
    };
    s.set_webhook(&owed, &status("delivered")).await.unwrap();
    s.set_webhook(&failed, &status("pending")).await.unwrap();
    tokio::time::sleep(hold + Duration::from_millis(200)).await;
    assert_eq!(s.claim_webhooks(10).await.unwrap(), vec![failed.clone()]);
    // Replayed meanwhile: queued again, so nothing is owed until it ends again.
    let stored = s.get(&failed).await.unwrap().unwrap();
    s.requeue(&stored, &message(&failed)).await.unwrap();
    tokio::time::sleep(hold + Duration::from_millis(200)).await;
    assert!(s.claim_webhooks(10).await.unwrap().is_empty());
    // A limit of 0 claims nothing; the in-memory store keeps no outbox.
    assert!(s.claim_webhooks(0).await.unwrap().is_empty());
    let m = MemoryTaskStore::new(Duration::from_secs(60), 100, 1024);
    assert!(!m.keeps_outbox());
}

/// A decoupled model's responses, kept with the task: in order, for the attempt that runs
/// (fenced), bounded in bytes (the result limit), started over by a new attempt, refused
/// once the task is no longer running. Both stores alike (limit: 1024 bytes).
async fn responses_contract(s: &dyn TaskStore) {
    let a = new_task_id();
    s.create(rec(&a), 0, None).await.unwrap();
    let running = |count_attempt| Change {
        count_attempt,
        ..Default::default()
    };
    // Nothing kept yet, and no such task at all.
    assert_eq!(s.responses(&a, 0, 10).await.unwrap(), Some(Kept::default()));
    assert_eq!(s.responses("no-such-task", 0, 10).await.unwrap(), None);
    // Only a running task keeps responses.
    assert!(
        s.append_response(&a, 0, Bytes::from_static(b"x"))
            .await
            .is_err()
    );
    s.transition(&a, TaskState::Running, running(true))
        .await
        .unwrap();
    for r in ["one", "two", "three"] {
        s.append_response(&a, 1, Bytes::from(r)).await.unwrap();
    }
    let kept = s.responses(&a, 0, 10).await.unwrap().unwrap();
    assert_eq!(kept.attempt, 1);
    assert_eq!(
        kept.responses,
        vec![Bytes::from("one"), Bytes::from("two"), Bytes::from("three")]
    );
    // A page from an index.
    let page = s.responses(&a, 1, 1).await.unwrap().unwrap();
    assert_eq!(page.responses, vec![Bytes::from("two")]);
    // Another attempt's writer is fenced off.
    let err = s
        .append_response(&a, 2, Bytes::from("late"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                fence: 2,
                current: 1,
                ..
            }
        ),
        "{err:?}"
    );
    // All responses together stay under the result limit.
    let err = s
        .append_response(&a, 1, Bytes::from(vec![b'z'; 1020]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ResultTooLarge { limit: 1024, .. }),
        "{err:?}"
    );
    assert_eq!(
        s.responses(&a, 0, 10)
            .await
            .unwrap()
            .unwrap()
            .responses
            .len(),
        3
    );
    // A retry starts its responses over.
    s.transition(
        &a,
        TaskState::Queued,
        Change {
            fence: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.transition(&a, TaskState::Running, running(true))
        .await
        .unwrap();
    s.append_response(&a, 2, Bytes::from("again"))
        .await
        .unwrap();
    let kept = s.responses(&a, 0, 10).await.unwrap().unwrap();
    assert_eq!(
        (kept.attempt, kept.responses),
        (2, vec![Bytes::from("again")])
    );
    // Cancelled: a response that comes late is refused, and what was kept stays readable.
    s.transition(&a, TaskState::Cancelled, Change::default())
        .await
        .unwrap();
    let err = s
        .append_response(&a, 2, Bytes::from("after"))
        .await
        .unwrap_err();
    assert_conflict(&err, TaskState::Cancelled, TaskState::Running);
    assert_eq!(
        s.responses(&a, 0, 10)
            .await
            .unwrap()
            .unwrap()
            .responses
            .len(),
        1
    );
}

#[tokio::test]
async fn both_stores_keep_a_decoupled_models_responses() {
    responses_contract(&MemoryTaskStore::new(Duration::from_secs(60), 100, 1024)).await;
    let prefix = format!("igtest-{}", new_task_id());
    let s = RedisTaskStore::connect(common::REDIS, &prefix, Duration::from_secs(60), 1024)
        .await
        .unwrap();
    responses_contract(&s).await;
}
