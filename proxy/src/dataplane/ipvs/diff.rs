//! Pure diff: desired virtual servers vs. what IPVS holds -> the operations that make IPVS
//! match, touching only what changed. Removed real servers terminate gracefully: first
//! their weight goes to 0 (no new connections, existing ones continue), and they are
//! deleted once their active and inactive connection counts reach 0 or after
//! [`Terminating::timeout`]. UDP and SCTP real servers are deleted at once, as kube-proxy
//! does: their flows have no end the connection counters could report, and
//! `expire_nodest_conn` ends them on their next packet.
//!
//! Only weir's virtual servers are touched ([`owned`]): others on the node (another load
//! balancer's, an operator's) are neither adopted nor deleted.

use super::{IpvsState, Op, RealServer, ServiceKey, NODE_PORT_RANGE};
use crate::model::Protocol;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// Whether a virtual server found in the kernel is weir's: its address is bound to the
/// dummy interface (`bound`: ClusterIPs, external and load-balancer IPs), or it is a
/// NodePort ([`NODE_PORT_RANGE`]) on one of the node addresses weir serves NodePorts on.
pub fn owned(key: &ServiceKey, bound: &BTreeSet<IpAddr>, node_ips: &BTreeSet<IpAddr>) -> bool {
    bound.contains(&key.addr)
        || (node_ips.contains(&key.addr) && NODE_PORT_RANGE.contains(&key.port))
}

/// The part of a dump weir manages: the virtual servers it wants and those [`owned`].
pub fn managed(
    realized: IpvsState,
    desired: &IpvsState,
    bound: &BTreeSet<IpAddr>,
    node_ips: &BTreeSet<IpAddr>,
) -> IpvsState {
    realized
        .into_iter()
        .filter(|(k, _)| desired.contains_key(k) || owned(k, bound, node_ips))
        .collect()
}

/// Whether removed real servers of this protocol drain gracefully (TCP) or are deleted at
/// once (UDP, SCTP).
fn drains(protocol: Protocol) -> bool {
    protocol == Protocol::Tcp
}
use std::time::{Duration, Instant};

/// Real servers on their way out: when each was first seen at weight 0 without being
/// desired.
#[derive(Clone, Debug)]
pub struct Terminating {
    /// Since when each (virtual server, real server) drains.
    pub since: BTreeMap<(ServiceKey, SocketAddr), Instant>,
    /// Longest drain before deletion.
    pub timeout: Duration,
}

impl Terminating {
    /// No real server draining; `timeout` is the longest drain.
    pub fn new(timeout: Duration) -> Self {
        Terminating {
            since: BTreeMap::new(),
            timeout,
        }
    }
}

/// The operations that turn `realized` into `desired` at time `now`, in an order IPVS
/// accepts: deleted services, new or changed services, then real servers. Updates
/// `terminating`.
pub fn plan(
    desired: &IpvsState,
    realized: &IpvsState,
    terminating: &mut Terminating,
    now: Instant,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for key in realized.keys() {
        if !desired.contains_key(key) {
            ops.push(Op::DelService(*key));
        }
    }
    let mut dest_ops = Vec::new();
    for (key, want) in desired {
        let have = realized.get(key);
        match have {
            None => ops.push(Op::AddService(want.server.clone())),
            Some(h) if h.server != want.server => ops.push(Op::UpdateService(want.server.clone())),
            Some(_) => {}
        }
        let empty = BTreeMap::new();
        let have_dests = have.map(|h| &h.dests).unwrap_or(&empty);
        for (addr, d) in &want.dests {
            match have_dests.get(addr) {
                None => dest_ops.push(Op::AddDest(*key, *d)),
                Some(h) if h.weight != d.weight => {
                    dest_ops.push(Op::UpdateDest(*key, RealServer::new(*addr, d.weight)))
                }
                Some(_) => {}
            }
            terminating.since.remove(&(*key, *addr));
        }
        for (addr, h) in have_dests {
            if want.dests.contains_key(addr) {
                continue;
            }
            let id = (*key, *addr);
            if !drains(key.protocol) {
                dest_ops.push(Op::DelDest(*key, *addr));
                terminating.since.remove(&id);
                continue;
            }
            if h.weight != 0 {
                dest_ops.push(Op::UpdateDest(*key, RealServer::new(*addr, 0)));
                terminating.since.insert(id, now);
                continue;
            }
            let since = *terminating.since.entry(id).or_insert(now);
            let drained = h.active_conns == 0 && h.inactive_conns == 0;
            if drained || now.duration_since(since) >= terminating.timeout {
                dest_ops.push(Op::DelDest(*key, *addr));
                terminating.since.remove(&id);
            }
        }
    }
    // Forget real servers whose virtual server is gone or that vanished meanwhile.
    terminating.since.retain(|(k, a), _| {
        desired.contains_key(k) && realized.get(k).is_some_and(|s| s.dests.contains_key(a))
    });
    ops.extend(dest_ops);
    ops
}

/// Whether a real server is still draining (the next sync has work to do).
pub fn draining(terminating: &Terminating) -> bool {
    !terminating.since.is_empty()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::fake::FakeIpvs;
    use super::super::{IpvsBackend, ServiceState, VirtualServer};
    use super::*;
    use crate::model::Protocol;

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            addr: "10.96.0.10".parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    #[test]
    fn a_removed_udp_dest_is_deleted_at_once_even_with_flows() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        let udp = |dests: &[&str]| -> IpvsState {
            let (mut k, mut s) = svc(53, "rr", dests);
            k.protocol = Protocol::Udp;
            s.server.key = k;
            [(k, s)].into()
        };
        sync(
            &mut fake,
            &udp(&["10.244.1.10:5353", "10.244.1.11:5353"]),
            &mut t,
            now,
        );
        let k = *udp(&[]).keys().next().unwrap();
        let b: SocketAddr = "10.244.1.11:5353".parse().unwrap();
        fake.set_conns(k, b, 0, 4);
        let ops = sync(&mut fake, &udp(&["10.244.1.10:5353"]), &mut t, now);
        assert_eq!(ops, vec![Op::DelDest(k, b)]);
        assert!(!draining(&t));
    }

    #[test]
    fn virtual_servers_that_are_not_weirs_are_neither_adopted_nor_deleted() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let at = |addr: &str, port: u16| {
            let (_, mut s) = svc(port, "rr", &["10.244.1.10:8080"]);
            s.server.key.addr = ip(addr);
            (s.server.key, s)
        };
        // Someone else's: a VIP not on weir-ipvs0, a node address outside the NodePort
        // range. Weir's leftovers: a ClusterIP still bound, a NodePort on a node address.
        let foreign: IpvsState = [at("192.0.2.1", 80), at("192.168.77.10", 8443)].into();
        let stale: IpvsState = [at("10.96.0.99", 80), at("192.168.77.10", 30099)].into();
        for (_, s) in foreign.iter().chain(&stale) {
            fake.apply(&Op::AddService(s.server.clone())).unwrap();
        }
        let bound: BTreeSet<IpAddr> = [ip("10.96.0.99"), ip("10.96.0.10")].into();
        let nodes: BTreeSet<IpAddr> = [ip("192.168.77.10")].into();
        let desired: IpvsState = [at("10.96.0.10", 80)].into();
        let realized = managed(fake.dump().unwrap(), &desired, &bound, &nodes);
        let ops = plan(&desired, &realized, &mut t, now);
        for op in &ops {
            fake.apply(op).unwrap();
        }
        let mut want: Vec<&ServiceKey> = foreign.keys().chain(desired.keys()).collect();
        want.sort();
        assert_eq!(fake.dump().unwrap().keys().collect::<Vec<_>>(), want);
        assert!(ops
            .iter()
            .all(|op| !matches!(op, Op::DelService(k) if foreign.contains_key(k))));
    }

    fn svc(port: u16, sched: &str, dests: &[&str]) -> (ServiceKey, ServiceState) {
        (
            key(port),
            ServiceState {
                server: VirtualServer {
                    key: key(port),
                    scheduler: sched.into(),
                    persistent_timeout: None,
                },
                dests: dests
                    .iter()
                    .map(|d| {
                        let a: SocketAddr = d.parse().unwrap();
                        (a, RealServer::new(a, 1))
                    })
                    .collect(),
            },
        )
    }

    fn sync(
        fake: &mut FakeIpvs,
        desired: &IpvsState,
        t: &mut Terminating,
        now: Instant,
    ) -> Vec<Op> {
        let realized = fake.dump().unwrap();
        let ops = plan(desired, &realized, t, now);
        for op in &ops {
            fake.apply(op).unwrap();
        }
        ops
    }

    #[test]
    fn applying_the_plan_reaches_the_desired_state_and_then_nothing_changes() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        let desired: IpvsState = [
            svc(80, "rr", &["10.244.1.10:8080", "10.244.1.11:8080"]),
            svc(443, "wrr", &["10.244.1.10:8443"]),
        ]
        .into();
        assert_eq!(sync(&mut fake, &desired, &mut t, now).len(), 5);
        assert_eq!(fake.dump().unwrap(), desired);
        assert!(sync(&mut fake, &desired, &mut t, now).is_empty());
    }

    #[test]
    fn only_changed_services_and_dests_are_touched() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        let before: IpvsState = [
            svc(80, "rr", &["10.244.1.10:8080"]),
            svc(443, "rr", &["10.244.1.10:8443"]),
        ]
        .into();
        sync(&mut fake, &before, &mut t, now);
        let after: IpvsState = [
            svc(80, "rr", &["10.244.1.10:8080", "10.244.1.12:8080"]),
            svc(443, "lc", &["10.244.1.10:8443"]),
        ]
        .into();
        let ops = sync(&mut fake, &after, &mut t, now);
        assert_eq!(
            ops,
            vec![
                Op::UpdateService(after[&key(443)].server.clone()),
                Op::AddDest(
                    key(80),
                    RealServer::new("10.244.1.12:8080".parse().unwrap(), 1)
                ),
            ]
        );
    }

    #[test]
    fn a_removed_dest_drains_at_weight_zero_until_its_connections_end() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        let a: SocketAddr = "10.244.1.10:8080".parse().unwrap();
        let b: SocketAddr = "10.244.1.11:8080".parse().unwrap();
        sync(
            &mut fake,
            &[svc(80, "rr", &["10.244.1.10:8080", "10.244.1.11:8080"])].into(),
            &mut t,
            now,
        );
        fake.set_conns(key(80), b, 3, 0);
        let only_a: IpvsState = [svc(80, "rr", &["10.244.1.10:8080"])].into();
        let ops = sync(&mut fake, &only_a, &mut t, now);
        assert_eq!(ops, vec![Op::UpdateDest(key(80), RealServer::new(b, 0))]);
        assert!(draining(&t));
        // Still connected: kept at weight 0.
        assert!(sync(&mut fake, &only_a, &mut t, now + Duration::from_secs(5)).is_empty());
        fake.set_conns(key(80), b, 0, 0);
        let ops = sync(&mut fake, &only_a, &mut t, now + Duration::from_secs(6));
        assert_eq!(ops, vec![Op::DelDest(key(80), b)]);
        assert!(!draining(&t));
        assert_eq!(
            fake.dump().unwrap()[&key(80)]
                .dests
                .keys()
                .collect::<Vec<_>>(),
            [&a]
        );
    }

    #[test]
    fn a_draining_dest_is_deleted_after_the_timeout_even_with_connections() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        let b: SocketAddr = "10.244.1.11:8080".parse().unwrap();
        sync(
            &mut fake,
            &[svc(80, "rr", &["10.244.1.11:8080"])].into(),
            &mut t,
            now,
        );
        fake.set_conns(key(80), b, 1, 1);
        let none: IpvsState = [svc(80, "rr", &[])].into();
        sync(&mut fake, &none, &mut t, now);
        assert!(sync(&mut fake, &none, &mut t, now + Duration::from_secs(59)).is_empty());
        let ops = sync(&mut fake, &none, &mut t, now + Duration::from_secs(60));
        assert_eq!(ops, vec![Op::DelDest(key(80), b)]);
    }

    #[test]
    fn a_draining_dest_that_comes_back_gets_its_weight_again() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        let b: SocketAddr = "10.244.1.11:8080".parse().unwrap();
        let with_b: IpvsState = [svc(80, "rr", &["10.244.1.11:8080"])].into();
        sync(&mut fake, &with_b, &mut t, now);
        fake.set_conns(key(80), b, 1, 0);
        sync(&mut fake, &[svc(80, "rr", &[])].into(), &mut t, now);
        let ops = sync(&mut fake, &with_b, &mut t, now);
        assert_eq!(ops, vec![Op::UpdateDest(key(80), RealServer::new(b, 1))]);
        assert!(!draining(&t));
    }

    #[test]
    fn a_removed_service_is_deleted_with_its_dests() {
        let mut fake = FakeIpvs::default();
        let mut t = Terminating::new(Duration::from_secs(60));
        let now = Instant::now();
        sync(
            &mut fake,
            &[svc(80, "rr", &["10.244.1.10:8080"])].into(),
            &mut t,
            now,
        );
        let ops = sync(&mut fake, &IpvsState::new(), &mut t, now);
        assert_eq!(ops, vec![Op::DelService(key(80))]);
        assert!(fake.dump().unwrap().is_empty());
    }
}
