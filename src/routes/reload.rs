//! The routes file read again: on SIGHUP, and every `routes.watch_ms` when its content
//! changed (a mounted ConfigMap is replaced without a signal). A file that does not load, or
//! names what the backend does not serve, is refused and the running routes stay.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::{RouteTable, Routes, metrics};

/// Reads the routes file again on each SIGHUP (and on a change seen every `watch`); one that
/// does not load or that `check` refuses is logged with its setting named and counted, and
/// the running routes stay. At start the running routes are checked once `ready` says the
/// backend can describe its models.
pub fn spawn_reload<R, C, F>(
    routes: Arc<Routes>,
    watch: Duration,
    stop: CancellationToken,
    ready: R,
    check: C,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    R: Fn() -> bool + Send + 'static,
    C: Fn(Arc<RouteTable>) -> F + Send + 'static,
    F: Future<Output = Result<(), String>> + Send,
{
    let mut hangup = signal(SignalKind::hangup())?;
    // The content last read, so that the watch reloads on a change only.
    let content = |routes: &Routes| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        routes
            .file()
            .and_then(|f| std::fs::read(f).ok())
            .hash(&mut h);
        h.finish()
    };
    let mut seen = content(&routes);
    let watching = !watch.is_zero() && routes.file().is_some();
    let mut tick = tokio::time::interval(if watching {
        watch
    } else {
        Duration::from_secs(3600)
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Ok(tokio::spawn(async move {
        // At start, the routes are checked once Triton can describe the models; an unknown
        // model or a mismatch is reported (the routes already run).
        if !routes.get_all().is_empty() {
            let retry = Duration::from_secs(1);
            loop {
                if ready() {
                    if let Err(e) = check(routes.table()).await {
                        tracing::error!(error = %e, "a route names a model Triton does not serve, or a fallback that does not fit its targets");
                    }
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hangup.recv() => if got.is_none() { return },
                _ = tick.tick() => {
                    let now = content(&routes);
                    if !watching || now == seen {
                        continue;
                    }
                }
            }
            seen = content(&routes);
            let file = routes.file().map(|f| f.display().to_string());
            let checked = match routes.read() {
                Ok(table) => {
                    let table = Arc::new(table);
                    match check(Arc::clone(&table)).await {
                        Ok(()) => {
                            let n = table.routes.len();
                            routes.set(Arc::unwrap_or_clone(table));
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match checked {
                Ok(n) => {
                    metrics::metrics().reload("ok");
                    tracing::info!(routes = n, file = ?file, "routes reloaded");
                }
                Err(e) => {
                    metrics::metrics().reload("refused");
                    tracing::error!(error = %e, file = ?file, "routes file refused; the running routes stay");
                }
            }
        }
    }))
}
