//! Async-task load: submit N tasks over HTTP at a fixed concurrency, then poll until every one
//! is final. Reports end-to-end completed tasks per second (first submit to last completion).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{LoadSpec, Sender};

#[derive(Debug, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct TaskRun {
    pub submitted: u64,
    /// Submissions refused (4xx/5xx), by status.
    pub refused: std::collections::BTreeMap<String, u64>,
    pub succeeded: u64,
    pub failed: u64,
    pub submit_seconds: f64,
    pub total_seconds: f64,
    /// Completed tasks per second, end to end.
    pub tasks_per_second: f64,
}

impl TaskRun {
    pub fn text(&self) -> String {
        format!(
            "Tasks:\n  Submitted:    {}\n  Refused:      {:?}\n  Succeeded:    {}\n  Failed:       {}\n  Submit time:  {:.2} s\n  Total time:   {:.2} s\n  Tasks/sec:    {:.1}\n",
            self.submitted,
            self.refused,
            self.succeeded,
            self.failed,
            self.submit_seconds,
            self.total_seconds,
            self.tasks_per_second
        )
    }
}

/// The two fields this generator reads from a task body; serde skips the rest (the inference
/// response included) without building it, which keeps the generator's own CPU per task low.
#[derive(Deserialize)]
struct TaskHead {
    #[serde(default)]
    id: String,
    #[serde(default)]
    status: String,
}

/// Runs `count` tasks against `spec.target` (HTTP) for `spec.model`.
pub async fn run_tasks(spec: &LoadSpec, count: u64) -> Result<TaskRun, String> {
    let Sender::Http {
        client,
        url,
        body,
        header_len,
    } = Sender::connect(spec).await?
    else {
        return Err("task load needs an HTTP target (--http)".into());
    };
    let submit_url = url
        .replace("/v2/models/", "/v1/models/")
        .replace("/infer", "/tasks");
    let base = format!("http://{}", spec.target);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut submitters = Vec::new();
    for _ in 0..spec.concurrency.max(1) {
        let (client, submit_url, body, next) = (
            client.clone(),
            submit_url.clone(),
            body.clone(),
            Arc::clone(&next),
        );
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut refused: std::collections::BTreeMap<String, u64> = Default::default();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let r = client
                    .post(&submit_url)
                    .header("Inference-Header-Content-Length", header_len)
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status().as_u16() == 202 => {
                        if let Ok(t) = resp.json::<TaskHead>().await
                            && !t.id.is_empty()
                        {
                            ids.push(t.id);
                        }
                    }
                    Ok(resp) => {
                        *refused
                            .entry(resp.status().as_u16().to_string())
                            .or_default() += 1
                    }
                    Err(_) => *refused.entry("transport".into()).or_default() += 1,
                }
            }
            (ids, refused)
        }));
    }
    let mut run = TaskRun::default();
    let mut pending = Vec::new();
    for s in submitters {
        let (ids, refused) = s.await.map_err(|e| e.to_string())?;
        pending.extend(ids);
        for (k, v) in refused {
            *run.refused.entry(k).or_default() += v;
        }
    }
    run.submitted = pending.len() as u64;
    run.submit_seconds = started.elapsed().as_secs_f64();

    // Poll in rounds; each round checks every pending task once, `concurrency` at a time.
    let deadline = Instant::now() + spec.timeout.max(Duration::from_secs(60));
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "{} tasks not final before the timeout",
                pending.len()
            ));
        }
        let chunks: Vec<Vec<String>> = pending
            .chunks(pending.len().div_ceil(spec.concurrency.max(1)))
            .map(<[String]>::to_vec)
            .collect();
        let mut pollers = Vec::new();
        for chunk in chunks {
            let (client, base) = (client.clone(), base.clone());
            pollers.push(tokio::spawn(async move {
                let mut left = Vec::new();
                let (mut ok, mut failed) = (0u64, 0u64);
                for id in chunk {
                    let status = match client.get(format!("{base}/v1/tasks/{id}")).send().await {
                        Ok(r) => r.json::<TaskHead>().await.ok().map(|t| t.status),
                        Err(_) => None,
                    };
                    match status.as_deref() {
                        Some("succeeded") => ok += 1,
                        Some("failed" | "cancelled" | "expired") => failed += 1,
                        _ => left.push(id),
                    }
                }
                (left, ok, failed)
            }));
        }
        pending.clear();
        for p in pollers {
            let (left, ok, failed) = p.await.map_err(|e| e.to_string())?;
            pending.extend(left);
            run.succeeded += ok;
            run.failed += failed;
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    run.total_seconds = started.elapsed().as_secs_f64();
    run.tasks_per_second = (run.succeeded + run.failed) as f64 / run.total_seconds.max(1e-9);
    Ok(run)
}
