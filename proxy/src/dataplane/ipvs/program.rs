//! Bringing any [`IpvsBackend`] (the kernel or the fake) to a desired [`IpvsState`], reading
//! it back only when the last known state cannot be trusted.
//!
//! After a sync that applied every operation, IPVS holds exactly the desired state, except
//! for removed real servers still draining at weight 0, so the next sync can diff against
//! that instead of dumping every virtual server and real server over netlink: only the
//! virtual servers with draining real servers are read again (their connection counters
//! decide when those go). The whole table is dumped on a full sync (which repairs drift)
//! and after any failure, as the nftables and eBPF paths re-read the kernel only on full
//! syncs and after failures.

use super::diff::{self, Terminating};
use super::{IpvsBackend, IpvsError, IpvsState, ServiceKey};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tracing::warn;

/// Which virtual servers found in a dump are weir's (see [`diff::owned`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Addresses bound to the dummy interface (before and after this sync).
    pub bound: BTreeSet<IpAddr>,
    /// Node addresses NodePorts were served on.
    pub node_ips: BTreeSet<IpAddr>,
}

/// What one sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// IPVS operations applied.
    pub ops: usize,
    /// Operations the kernel refused.
    pub failed: usize,
    /// Whether removed real servers are still draining (another sync is needed).
    pub draining: bool,
    /// Whether IPVS was dumped (rather than diffed against the last applied state).
    pub dumped: bool,
}

/// The state kept between syncs: the draining real servers and, when it can be trusted,
/// what IPVS holds.
#[derive(Clone, Debug)]
pub struct Programmer {
    terminating: Terminating,
    /// weir's part of IPVS after the last sync, when that sync applied everything (the
    /// virtual servers with draining real servers excepted: they are read again before
    /// each use); `None` makes the next sync dump.
    last: Option<IpvsState>,
}

impl Programmer {
    /// Nothing known yet (the first sync dumps); removed real servers drain for at most
    /// `drain_timeout`.
    pub fn new(drain_timeout: Duration) -> Self {
        Programmer {
            terminating: Terminating::new(drain_timeout),
            last: None,
        }
    }

    /// Whether the next sync must dump IPVS: a full sync, or nothing trusted (first sync,
    /// after a failure).
    pub fn needs_dump(&self, full: bool) -> bool {
        full || self.last.is_none()
    }

    /// Whether removed real servers are still draining: a later sync (even one with no
    /// change) must look at their connections and delete them once they are gone.
    pub fn draining(&self) -> bool {
        diff::draining(&self.terminating)
    }

    /// Reads the virtual servers with draining real servers into `last` (their counters
    /// and what is left of them); returns their keys.
    fn refresh_draining<B: IpvsBackend>(
        &self,
        backend: &mut B,
        last: &mut IpvsState,
    ) -> Result<BTreeSet<ServiceKey>, IpvsError> {
        let keys: BTreeSet<ServiceKey> = self.terminating.since.keys().map(|(k, _)| *k).collect();
        for k in &keys {
            match backend.read_service(k)? {
                Some(s) => last.insert(*k, s),
                None => last.remove(k),
            };
        }
        Ok(keys)
    }

    /// Forgets the last applied state (something else failed; the next sync dumps).
    pub fn invalidate(&mut self) {
        self.last = None;
    }

    /// Makes `backend` hold `want` at time `now`: dumps it when [`Self::needs_dump`]`(full)`
    /// (then `owned` tells weir's virtual servers from others), applies only the
    /// difference, and logs and counts refused operations; the rest proceed.
    pub fn sync<B: IpvsBackend>(
        &mut self,
        backend: &mut B,
        want: IpvsState,
        full: bool,
        owned: &Ownership,
        now: Instant,
    ) -> Result<SyncReport, IpvsError> {
        let dumped = self.needs_dump(full);
        let have = match self.last.take() {
            Some(mut last) if !dumped => {
                self.refresh_draining(backend, &mut last)?;
                last
            }
            _ => diff::managed(backend.dump()?, &want, &owned.bound, &owned.node_ips),
        };
        let ops = diff::plan(&want, &have, &mut self.terminating, now);
        let mut report = SyncReport {
            ops: ops.len(),
            dumped,
            ..Default::default()
        };
        report.failed = apply_logged(backend, &ops);
        report.draining = diff::draining(&self.terminating);
        // With every operation applied, IPVS holds `want` (and the draining real servers,
        // read again before the next use).
        self.last = (report.failed == 0).then_some(want);
        Ok(report)
    }
}

impl Programmer {
    /// Like [`Self::sync`] when only the virtual servers in `touched` may differ from the
    /// last sync's: compares and updates just those and the ones with draining real
    /// servers (read again first). Needs a trusted last state (no dump due; see
    /// [`Self::needs_dump`]); without one it falls back to a full [`Self::sync`].
    pub fn sync_touched<B: IpvsBackend>(
        &mut self,
        backend: &mut B,
        want: &IpvsState,
        touched: &BTreeSet<ServiceKey>,
        owned: impl FnOnce() -> Ownership,
        now: Instant,
    ) -> Result<SyncReport, IpvsError> {
        let trusted = !self.needs_dump(false);
        let mut last = match self.last.take() {
            Some(last) if trusted => last,
            _ => return self.sync(backend, want.clone(), false, &owned(), now),
        };
        let mut keys = self.refresh_draining(backend, &mut last)?;
        keys.extend(touched.iter().copied());
        let part = |s: &IpvsState| -> IpvsState {
            keys.iter()
                .filter_map(|k| s.get(k).map(|v| (*k, v.clone())))
                .collect()
        };
        let ops = diff::plan(&part(want), &part(&last), &mut self.terminating, now);
        let mut report = SyncReport {
            ops: ops.len(),
            ..Default::default()
        };
        report.failed = apply_logged(backend, &ops);
        report.draining = diff::draining(&self.terminating);
        if report.failed == 0 {
            for k in &keys {
                match want.get(k) {
                    Some(s) => last.insert(*k, s.clone()),
                    None => last.remove(k),
                };
            }
            self.last = Some(last);
        }
        Ok(report)
    }
}

/// Applies `ops`, logging each refused one; returns how many were refused.
fn apply_logged<B: IpvsBackend>(backend: &mut B, ops: &[super::Op]) -> usize {
    let mut failed = 0;
    for r in backend.apply_all(ops) {
        if let Err(e) = r {
            warn!(error = %e, "IPVS operation failed");
            failed += 1;
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::fake::FakeIpvs;
    use super::super::{Op, RealServer, ServiceKey, ServiceState, VirtualServer};
    use super::*;
    use crate::model::Protocol;
    use std::net::SocketAddr;

    fn state(services: u16, dests: u8) -> IpvsState {
        (0..services)
            .map(|i| {
                let key = ServiceKey {
                    addr: IpAddr::from([10, 96, (i >> 8) as u8, i as u8]),
                    protocol: Protocol::Tcp,
                    port: 80,
                };
                let dests = (0..dests)
                    .map(|d| {
                        let a = SocketAddr::from(([10, 244, 1, d], 8080));
                        (a, RealServer::new(a, 1))
                    })
                    .collect();
                let server = VirtualServer {
                    key,
                    scheduler: "rr".into(),
                    persistent_timeout: None,
                };
                (key, ServiceState { server, dests })
            })
            .collect()
    }

    fn owned(want: &IpvsState) -> Ownership {
        Ownership {
            bound: want.keys().map(|k| k.addr).collect(),
            node_ips: BTreeSet::new(),
        }
    }

    #[test]
    fn idle_and_incremental_syncs_do_not_dump_but_full_syncs_and_failures_do() {
        let mut fake = FakeIpvs::default();
        let mut p = Programmer::new(Duration::from_secs(60));
        let now = Instant::now();
        let want = state(3, 2);
        let o = owned(&want);
        let r = p.sync(&mut fake, want.clone(), false, &o, now).unwrap();
        assert!(r.dumped, "the first sync reads what is there");
        assert_eq!((r.ops, fake.dumps), (9, 1));
        // Nothing changed: no dump, no operation.
        let r = p.sync(&mut fake, want.clone(), false, &o, now).unwrap();
        assert_eq!((r.dumped, r.ops, fake.dumps), (false, 0, 1));
        // One endpoint added: one operation, still no dump.
        let mut more = want.clone();
        let k = *more.keys().next().unwrap();
        let a: SocketAddr = "10.244.1.99:8080".parse().unwrap();
        more.get_mut(&k)
            .unwrap()
            .dests
            .insert(a, RealServer::new(a, 1));
        let r = p.sync(&mut fake, more.clone(), false, &o, now).unwrap();
        assert_eq!(
            (r.dumped, fake.dumps),
            (false, 1),
            "an incremental sync trusts the last state"
        );
        assert_eq!(fake.dump().unwrap(), more);
        fake.dumps = 0;
        // A full sync dumps, and repairs what changed behind weir's back.
        fake.apply(&Op::DelDest(k, a)).unwrap();
        let r = p.sync(&mut fake, more.clone(), true, &o, now).unwrap();
        assert_eq!((r.dumped, r.ops, fake.dumps), (true, 1, 1));
        assert_eq!(fake.dump().unwrap(), more);
        fake.dumps = 0;
        // A refused operation: the next sync dumps.
        let mut bad = more.clone();
        let k2 = *bad.keys().nth(1).unwrap();
        bad.get_mut(&k2).unwrap().server.scheduler = "nope".into();
        let r = p.sync(&mut fake, bad, false, &o, now).unwrap();
        assert_eq!((r.dumped, r.failed), (false, 1));
        let r = p.sync(&mut fake, more.clone(), false, &o, now).unwrap();
        assert_eq!((r.dumped, r.ops, fake.dumps), (true, 0, 1));
    }

    #[test]
    fn a_sync_of_touched_virtual_servers_changes_only_those_and_matches_a_full_sync() {
        let mut fake = FakeIpvs::default();
        let mut p = Programmer::new(Duration::from_secs(60));
        let now = Instant::now();
        let want = state(4, 2);
        let o = owned(&want);
        p.sync(&mut fake, want.clone(), false, &o, now).unwrap();
        let keys: Vec<ServiceKey> = want.keys().copied().collect();
        // One virtual server gains a real server, one goes, one is new.
        let mut next = want.clone();
        let a: SocketAddr = "10.244.1.99:8080".parse().unwrap();
        next.get_mut(&keys[0])
            .unwrap()
            .dests
            .insert(a, RealServer::new(a, 1));
        next.remove(&keys[1]);
        let mut s_new = next[&keys[2]].clone();
        s_new.server.key.port = 81;
        let k_new = s_new.server.key;
        next.insert(k_new, s_new);
        let touched: BTreeSet<ServiceKey> = [keys[0], keys[1], k_new].into();
        let applied = fake.applied;
        let r = p
            .sync_touched(&mut fake, &next, &touched, || o.clone(), now)
            .unwrap();
        // AddDest; DelService; AddService and its two AddDests.
        assert_eq!((r.dumped, r.ops, r.failed), (false, 5, 0), "{r:?}");
        assert_eq!(fake.applied - applied, 5);
        assert_eq!(fake.dump().unwrap(), next);
        fake.dumps = 0;
        // The last state followed: an idle full-diff sync has nothing to do.
        let r = p.sync(&mut fake, next.clone(), false, &o, now).unwrap();
        assert_eq!((r.dumped, r.ops, fake.dumps), (false, 0, 0));
    }

    #[test]
    fn syncs_read_only_the_draining_virtual_server_until_its_real_server_is_gone() {
        let mut fake = FakeIpvs::default();
        let mut p = Programmer::new(Duration::from_secs(60));
        let now = Instant::now();
        let want = state(1, 2);
        let o = owned(&want);
        p.sync(&mut fake, want.clone(), false, &o, now).unwrap();
        let k = *want.keys().next().unwrap();
        let gone: SocketAddr = "10.244.1.1:8080".parse().unwrap();
        fake.set_conns(k, gone, 2, 0);
        let mut fewer = want.clone();
        fewer.get_mut(&k).unwrap().dests.remove(&gone);
        let r = p.sync(&mut fake, fewer.clone(), false, &o, now).unwrap();
        assert!(r.draining && !r.dumped && p.draining(), "{r:?}");
        fake.dumps = 0;
        // Draining: each sync reads that virtual server's connection counters, no dump.
        let r = p.sync(&mut fake, fewer.clone(), false, &o, now).unwrap();
        assert_eq!((r.dumped, r.ops, r.draining), (false, 0, true));
        assert_eq!((fake.dumps, fake.reads), (0, 1));
        // An incremental sync of nothing (the runner's re-check) reads it too.
        let none = BTreeSet::new();
        let r = p
            .sync_touched(&mut fake, &fewer, &none, || o.clone(), now)
            .unwrap();
        assert_eq!((r.dumped, r.ops, r.draining), (false, 0, true));
        assert_eq!((fake.dumps, fake.reads), (0, 2));
        fake.set_conns(k, gone, 0, 0);
        let r = p
            .sync_touched(&mut fake, &fewer, &none, || o.clone(), now)
            .unwrap();
        assert_eq!((r.dumped, r.ops, r.draining), (false, 1, false));
        assert!(!p.draining());
        assert_eq!(fake.dump().unwrap(), fewer);
        fake.dumps = 0;
        // Drained and deleted: no reads any more, and the last state is the truth.
        let r = p.sync(&mut fake, fewer.clone(), false, &o, now).unwrap();
        assert_eq!((r.dumped, r.ops, fake.dumps, fake.reads), (false, 0, 0, 3));
    }

    #[test]
    fn a_draining_real_server_that_comes_back_is_weighted_again_without_a_dump() {
        let mut fake = FakeIpvs::default();
        let mut p = Programmer::new(Duration::from_secs(60));
        let now = Instant::now();
        let want = state(2, 2);
        let o = owned(&want);
        p.sync(&mut fake, want.clone(), false, &o, now).unwrap();
        let k = *want.keys().next().unwrap();
        let back: SocketAddr = "10.244.1.0:8080".parse().unwrap();
        fake.set_conns(k, back, 1, 0);
        let mut fewer = want.clone();
        fewer.get_mut(&k).unwrap().dests.remove(&back);
        let touched: BTreeSet<ServiceKey> = [k].into();
        let r = p
            .sync_touched(&mut fake, &fewer, &touched, || o.clone(), now)
            .unwrap();
        assert!(r.draining, "{r:?}");
        assert_eq!(fake.dump().unwrap()[&k].dests[&back].weight, 0);
        fake.dumps = 0;
        // The endpoint returns: its real server gets its weight back.
        let r = p
            .sync_touched(&mut fake, &want, &touched, || o.clone(), now)
            .unwrap();
        assert_eq!((r.dumped, r.draining), (false, false), "{r:?}");
        let mut got = fake.dump().unwrap();
        for s in got.values_mut() {
            for d in s.dests.values_mut() {
                (d.active_conns, d.inactive_conns) = (0, 0);
            }
        }
        assert_eq!(got, want);
    }

    /// Not a test of behaviour: prints what an idle sync and a one-endpoint change cost
    /// against the fake at 1,000 and 10,000 virtual servers, with and without a dump.
    /// `cargo test --release -p weir-proxy ipvs_sync_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "measurement: run by name with --ignored --nocapture"]
    fn ipvs_sync_cost() {
        for n in [1_000u16, 10_000] {
            let mut fake = FakeIpvs::default();
            let mut p = Programmer::new(Duration::from_secs(60));
            let now = Instant::now();
            let want = state(n, 10);
            let o = owned(&want);
            let t = Instant::now();
            p.sync(&mut fake, want.clone(), false, &o, now).unwrap();
            let first = t.elapsed();
            let rounds = 20;
            let t = Instant::now();
            for _ in 0..rounds {
                let r = p.sync(&mut fake, want.clone(), false, &o, now).unwrap();
                assert!(!r.dumped && r.ops == 0);
            }
            let idle = t.elapsed() / rounds;
            let t = Instant::now();
            for _ in 0..rounds {
                let r = p.sync(&mut fake, want.clone(), true, &o, now).unwrap();
                assert!(r.dumped && r.ops == 0);
            }
            let idle_dump = t.elapsed() / rounds;
            // Each round adds one endpoint to one more virtual server (a removal would start
            // a drain, during which syncs dump to read the connection counters).
            let a: SocketAddr = "10.244.2.1:8080".parse().unwrap();
            let mut states = Vec::new();
            let mut s = want.clone();
            for k in want.keys().take(rounds as usize * 2) {
                s.get_mut(k).unwrap().dests.insert(a, RealServer::new(a, 1));
                states.push((*k, s.clone()));
            }
            let (whole, touched) = states.split_at(rounds as usize);
            let t = Instant::now();
            for (_, s) in whole {
                let r = p.sync(&mut fake, s.clone(), false, &o, now).unwrap();
                assert_eq!((r.dumped, r.ops), (false, 1));
            }
            let change_whole = t.elapsed() / rounds;
            let t = Instant::now();
            for (k, s) in touched {
                let r = p
                    .sync_touched(&mut fake, s, &[*k].into(), || o.clone(), now)
                    .unwrap();
                assert_eq!((r.dumped, r.ops), (false, 1));
            }
            let change = t.elapsed() / rounds;
            println!(
                "{n} virtual servers x 10 real servers (fake): first sync {first:?}; \
                 no-op sync diffing everything {idle:?} (with a dump {idle_dump:?}); \
                 one endpoint added: diffing everything {change_whole:?}, \
                 diffing the touched virtual server {change:?}"
            );
        }
    }
}
