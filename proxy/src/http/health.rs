//! kube-proxy's proxier health: healthy unless an update has waited longer than the timeout.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Tracks when updates were queued and applied.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    /// Since when the source (API watches) has been failing without a success since.
    source_failing_since: Option<SystemTime>,
}

/// A health verdict with the times the JSON body reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthStatus {
    /// Whether the proxy is healthy.
    pub healthy: bool,
    /// When the rules were last synced successfully.
    pub last_updated: Option<SystemTime>,
    /// The time of the check.
    pub current_time: SystemTime,
    /// Whether the source has delivered within the timeout (false after the API server
    /// has been unreachable for longer: the programmed rules may be stale).
    pub source_healthy: bool,
}

impl ProxyHealth {
    /// Unhealthy when a queued update is older than `timeout` (kube-proxy: 2 × sync period).
    pub fn new(timeout: Duration) -> Self {
        ProxyHealth {
            timeout,
            state: Mutex::new(State::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A change is waiting to be synced.
    pub fn queued_update(&self, now: SystemTime) {
        self.with(|s| {
            if s.oldest_pending.is_none() {
                s.oldest_pending = Some(now);
            }
        });
    }

    /// Everything queued so far has been programmed.
    pub fn updated(&self, now: SystemTime) {
        self.with(|s| {
            s.last_updated = Some(now);
            s.oldest_pending = None;
        });
    }

    /// The source failed (an API watch error); it stays failing until [`Self::source_ok`].
    pub fn source_failed(&self, now: SystemTime) {
        self.with(|s| {
            if s.source_failing_since.is_none() {
                s.source_failing_since = Some(now);
            }
        });
    }

    /// The source delivered an event.
    pub fn source_ok(&self) {
        self.with(|s| s.source_failing_since = None);
    }

    /// The current verdict.
    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let s = self.with(|s| *s);
        let within = |t: Option<SystemTime>| match t {
            None => true,
            Some(t) => now.duration_since(t).unwrap_or_default() <= self.timeout,
        };
        let source_healthy = within(s.source_failing_since);
        HealthStatus {
            healthy: within(s.oldest_pending) && source_healthy,
            last_updated: s.last_updated,
            current_time: now,
            source_healthy,
        }
    }
}

impl crate::source::SourceHealth for ProxyHealth {
    fn source_ok(&self) {
        ProxyHealth::source_ok(self);
    }

    fn source_failed(&self, now: SystemTime) {
        ProxyHealth::source_failed(self, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn update_waiting_longer_than_timeout_is_unhealthy_until_synced() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        assert!(h.status(t(0)).healthy);
        h.queued_update(t(10));
        assert!(h.status(t(70)).healthy);
        assert!(!h.status(t(71)).healthy);
        h.updated(t(72));
        let s = h.status(t(73));
        assert!(s.healthy);
        assert_eq!(s.last_updated, Some(t(72)));
    }

    #[test]
    fn a_source_failing_longer_than_timeout_is_unhealthy_until_it_delivers() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        h.source_failed(t(10));
        h.source_failed(t(30));
        assert!(h.status(t(70)).healthy);
        let s = h.status(t(71));
        assert!(!s.healthy && !s.source_healthy);
        h.source_ok();
        assert!(h.status(t(72)).healthy);
    }
}
