//! The pool's members as discovery changes them: endpoints added for new addresses, and
//! endpoints whose address left drained: no new calls (they are off the list calls pick
//! from), the calls and streams in flight finish, then their connections close (when the last
//! call lets go of the endpoint) and their metrics go.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use super::{
    discovery::{Discovery, Resolved},
    endpoint::{Connector, Endpoint},
    metrics::metrics,
};

pub struct Members {
    pub(super) connector: Connector,
    pub(super) discovery: Discovery,
    /// Endpoints that left, with when they left, until their calls are done.
    draining: Mutex<Vec<(Arc<Endpoint>, Instant)>>,
    /// One change at a time.
    pub(super) changing: tokio::sync::Mutex<()>,
}

/// A new endpoint list, and the endpoints in it that are new.
pub type Change = (Vec<Arc<Endpoint>>, Vec<Arc<Endpoint>>);

impl Members {
    pub(super) fn new(connector: Connector, discovery: Discovery) -> Self {
        Self {
            connector,
            discovery,
            draining: Mutex::default(),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// The endpoint list `resolved` makes of `current` (`None`: no change): addresses already
    /// known keep their endpoint (its connections, latency and circuits), an address back
    /// from draining gets its endpoint back, new ones get a new endpoint, and the others start
    /// draining. The endpoints of a name whose lookup failed stay.
    pub(super) fn apply(&self, current: &[Arc<Endpoint>], resolved: &Resolved) -> Option<Change> {
        let mut draining = self.draining.lock().expect("draining lock");
        let mut next: Vec<Arc<Endpoint>> = current
            .iter()
            .filter(|e| resolved.failed.contains(&e.origin))
            .cloned()
            .collect();
        let mut added = Vec::new();
        for at in &resolved.addresses {
            if next.iter().any(|e| e.url == at.url) {
                continue;
            }
            if let Some(ep) = current.iter().find(|e| e.url == at.url) {
                next.push(Arc::clone(ep));
            } else if let Some(i) = draining.iter().position(|(e, _)| e.url == at.url) {
                let (ep, _) = draining.swap_remove(i);
                tracing::info!(endpoint = %ep.url, "Triton endpoint is back before it drained");
                next.push(ep);
            } else {
                match self.connector.open(at) {
                    Ok(ep) => {
                        tracing::info!(endpoint = %ep.url, origin = %ep.origin, "Triton endpoint added");
                        added.push(Arc::clone(&ep));
                        next.push(ep);
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = %at.url, error = %e, "Triton endpoint not added")
                    }
                }
            }
        }
        let kept: HashSet<&str> = next.iter().map(|e| e.url.as_str()).collect();
        let now = Instant::now();
        for ep in current.iter().filter(|e| !kept.contains(e.url.as_str())) {
            tracing::info!(
                endpoint = %ep.url,
                in_flight = ep.in_flight.load(Ordering::Relaxed),
                "Triton endpoint left: draining"
            );
            draining.push((Arc::clone(ep), now));
        }
        if added.is_empty() && next.len() == current.len() {
            return None;
        }
        metrics().endpoints.set(next.len() as i64);
        metrics().draining.set(draining.len() as i64);
        Some((next, added))
    }

    /// Lets go of drained endpoints: those with no call in flight, and those whose calls have
    /// had `limit` (the longest a call may take).
    pub(super) fn sweep(&self, limit: Duration) {
        let now = Instant::now();
        let mut draining = self.draining.lock().expect("draining lock");
        if draining.is_empty() {
            return;
        }
        draining.retain(|(ep, since)| {
            let left = ep.in_flight.load(Ordering::Relaxed);
            if left > 0 && now.duration_since(*since) < limit {
                return true;
            }
            tracing::info!(endpoint = %ep.url, in_flight = left, "Triton endpoint drained");
            let mut models = ep.placement.models();
            models.extend(ep.breakers.read().expect("breakers lock").keys().cloned());
            metrics().forget(&ep.url, models);
            false
        });
        metrics().draining.set(draining.len() as i64);
    }

    /// Endpoints that left and still have calls in flight.
    pub fn draining(&self) -> usize {
        self.draining.lock().expect("draining lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{config::TritonConfig, discovery::Address};

    fn at(url: &str, origin: &str) -> Address {
        Address {
            url: url.into(),
            origin: origin.into(),
            domain: Some("triton".into()),
        }
    }

    fn urls(list: &[Arc<Endpoint>]) -> Vec<String> {
        list.iter().map(|e| e.url.clone()).collect()
    }

    #[tokio::test]
    async fn addresses_are_added_kept_drained_and_taken_back() {
        let name = "http://triton:8001";
        let cfg = TritonConfig {
            urls: vec!["http://127.0.0.1:1".into(), name.into()],
            ..Default::default()
        };
        let members = Members::new(
            Connector::new(&cfg, 1 << 20, 0).unwrap(),
            Discovery::new(&cfg).unwrap(),
        );
        let fixed = at("http://127.0.0.1:1", "http://127.0.0.1:1");
        let start = vec![members.connector.open(&fixed).unwrap()];
        let (a, b, c) = (
            at("http://10.0.0.1:8001", name),
            at("http://10.0.0.2:8001", name),
            at("http://10.0.0.3:8001", name),
        );
        let resolved =
            |addresses: Vec<Address>, failed: Vec<String>| Resolved { addresses, failed };
        let (list, added) = members
            .apply(
                &start,
                &resolved(vec![fixed.clone(), a.clone(), b.clone()], vec![]),
            )
            .unwrap();
        assert_eq!(added.len(), 2);
        assert!(
            Arc::ptr_eq(&list[0], &start[0]),
            "the IP keeps its endpoint"
        );
        let first = Arc::clone(&list[1]);
        first.in_flight.fetch_add(1, Ordering::Relaxed);
        // a leaves with a call in flight, c comes: b keeps its endpoint.
        let (list2, _) = members
            .apply(
                &list,
                &resolved(vec![fixed.clone(), b.clone(), c.clone()], vec![]),
            )
            .unwrap();
        assert_eq!(
            urls(&list2),
            [
                "http://127.0.0.1:1",
                "http://10.0.0.2:8001",
                "http://10.0.0.3:8001"
            ]
        );
        assert!(Arc::ptr_eq(&list2[1], &list[2]));
        members.sweep(Duration::from_secs(30));
        assert_eq!(members.draining(), 1, "its call is still in flight");
        // A failed lookup of the name keeps its endpoints; the same answer changes nothing.
        let same = members.apply(&list2, &resolved(vec![fixed.clone()], vec![name.into()]));
        assert!(same.is_none());
        // a comes back before it drained: the same endpoint.
        let (list3, added) = members
            .apply(&list2, &resolved(vec![fixed.clone(), a.clone()], vec![]))
            .unwrap();
        assert!(added.is_empty());
        assert!(Arc::ptr_eq(&list3[1], &first));
        assert_eq!(members.draining(), 2, "b and c");
        members.sweep(Duration::from_secs(30));
        assert_eq!(members.draining(), 0, "no calls in flight on b and c");
        // One still in flight past the limit is let go too.
        members.apply(&list3, &resolved(vec![fixed.clone()], vec![]));
        members.sweep(Duration::ZERO);
        assert_eq!(members.draining(), 0);
        first.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
