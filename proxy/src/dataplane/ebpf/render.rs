//! [`render`]: a [`DesiredState`] -> the contents the services and backends maps should
//! hold (pure); [`diff`]: current contents -> desired contents as a [`MapPlan`] that touches
//! only the keys that change, in an order that never leaves a frontend pointing at a
//! missing slot.

use crate::model::{DesiredState, Endpoint, Protocol};
use std::collections::BTreeMap;
use std::net::IpAddr;
use weir_ebpf_common::{
    AddrPort, Backend, BackendKey, ServiceKey, ServiceValue, FAMILY_V4, FAMILY_V6, FLAG_DROP,
    PROTO_TCP, PROTO_UDP,
};

/// What the services and backends maps hold (or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// Frontend -> slot count.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// (frontend, slot) -> backend.
    pub backends: BTreeMap<BackendKey, Backend>,
}

impl MapContents {
    /// Entries in both maps.
    pub fn len(&self) -> usize {
        self.services.len() + self.backends.len()
    }

    /// Whether both maps are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or replace a backend slot.
    UpsertBackend(BackendKey, Backend),
    /// Insert or replace a frontend.
    UpsertService(ServiceKey, ServiceValue),
    /// Delete a frontend.
    DeleteService(ServiceKey),
    /// Delete a backend slot.
    DeleteBackend(BackendKey),
}

/// Map writes, in the order they must be applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPlan {
    /// The writes.
    pub ops: Vec<MapOp>,
}

impl MapPlan {
    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// An address and port as the maps hold them (network byte order, see
/// `weir-ebpf-common`).
pub fn addr_port(ip: IpAddr, port: u16, proto: u8) -> AddrPort {
    let (addr, family) = match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    };
    AddrPort {
        addr,
        port: u16::from_ne_bytes(port.to_be_bytes()),
        family,
        proto,
    }
}

/// The address and port an [`AddrPort`] holds (for logs and tests).
pub fn socket_addr(a: &AddrPort) -> std::net::SocketAddr {
    let port = u16::from_be_bytes(a.port.to_ne_bytes());
    let ip: IpAddr = if a.family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in a.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o.into()
    } else {
        a.addr[0].to_ne_bytes().into()
    };
    std::net::SocketAddr::new(ip, port)
}

/// The maps' contents for ClusterIP traffic of every TCP and UDP Service port: one frontend
/// per cluster IP, whose slots are the endpoints of that IP's family in slot order
/// (`internalTrafficPolicy: Local` uses only this node's). A frontend without endpoints
/// has `count` 0 (connect is refused); with endpoints elsewhere but none usable here it
/// also carries [`FLAG_DROP`]. SCTP ports are left out (the socket hooks do not see SCTP in
/// this slice).
pub fn render(desired: &DesiredState) -> MapContents {
    let mut out = MapContents::default();
    for sp in desired.services.values() {
        let proto = match sp.info.name.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Sctp => continue,
        };
        let eps: &[Endpoint] = if sp.info.internal_local {
            &sp.local_endpoints
        } else {
            &sp.endpoints
        };
        for ip in &sp.info.cluster_ips {
            let key = addr_port(*ip, sp.info.port, proto);
            let mut count = 0u32;
            for e in eps.iter().filter(|e| e.ip.is_ipv4() == ip.is_ipv4()) {
                out.backends.insert(
                    BackendKey {
                        service: key,
                        slot: count,
                    },
                    addr_port(e.ip, e.port, 0),
                );
                count += 1;
            }
            let flags = if count == 0 && sp.has_endpoints_for(ip) {
                FLAG_DROP
            } else {
                0
            };
            out.services.insert(key, ServiceValue { count, flags });
        }
    }
    out
}

/// The writes that turn `current` into `desired`, touching only changed keys: new and
/// changed backend slots first, then frontends (so a grown count never points at a missing
/// slot), then deleted frontends, then deleted slots (a shrunk count stops using them
/// first).
pub fn diff(current: &MapContents, desired: &MapContents) -> MapPlan {
    let mut ops = Vec::new();
    for (k, v) in &desired.backends {
        if current.backends.get(k) != Some(v) {
            ops.push(MapOp::UpsertBackend(*k, *v));
        }
    }
    for (k, v) in &desired.services {
        if current.services.get(k) != Some(v) {
            ops.push(MapOp::UpsertService(*k, *v));
        }
    }
    for k in current.services.keys() {
        if !desired.services.contains_key(k) {
            ops.push(MapOp::DeleteService(*k));
        }
    }
    for k in current.backends.keys() {
        if !desired.backends.contains_key(k) {
            ops.push(MapOp::DeleteBackend(*k));
        }
    }
    MapPlan { ops }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ebpf::fake::FakeMaps;
    use crate::dataplane::ebpf::MapStore;
    use crate::model::{ServiceInfo, ServicePortName, ServicePortState};

    fn name(n: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: "d".into(),
            name: n.into(),
            port: String::new(),
            protocol,
        }
    }

    fn ep(ip: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            is_local: true,
        }
    }

    fn state(services: &[(&str, &[&str], Protocol, &[&str])]) -> DesiredState {
        let mut d = DesiredState::default();
        for (n, ips, proto, eps) in services {
            let info = ServiceInfo::new(
                name(n, *proto),
                ips.iter().map(|i| i.parse().unwrap()).collect(),
                80,
            );
            let sp = ServicePortState::from_endpoints(info, eps.iter().map(|e| ep(e)).collect());
            d.services.insert(name(n, *proto), sp);
        }
        d
    }

    fn frontend(ip: &str, proto: u8) -> ServiceKey {
        addr_port(ip.parse().unwrap(), 80, proto)
    }

    fn apply(fake: &mut FakeMaps, d: &DesiredState) -> MapPlan {
        let plan = diff(&fake.dump().unwrap(), &render(d));
        fake.apply(&plan).unwrap();
        plan
    }

    #[test]
    fn addresses_and_ports_are_kept_in_network_byte_order() {
        let a = addr_port("10.96.0.10".parse().unwrap(), 80, PROTO_TCP);
        assert_eq!(a.addr[0].to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(a.port.to_ne_bytes(), [0, 80]);
        assert_eq!(socket_addr(&a), "10.96.0.10:80".parse().unwrap());
        let b = addr_port("fd00:10:96::a".parse().unwrap(), 53, PROTO_UDP);
        assert_eq!(b.family, FAMILY_V6);
        assert_eq!(socket_addr(&b), "[fd00:10:96::a]:53".parse().unwrap());
    }

    #[test]
    fn each_cluster_ip_gets_the_endpoints_of_its_family_in_slot_order() {
        let d = state(&[(
            "web",
            &["10.96.0.10", "fd00:10:96::10"],
            Protocol::Tcp,
            &["10.244.1.1", "fd00:10:244::1", "10.244.1.2"],
        )]);
        let m = render(&d);
        let v4 = frontend("10.96.0.10", PROTO_TCP);
        let v6 = frontend("fd00:10:96::10", PROTO_TCP);
        assert_eq!(m.services[&v4].count, 2);
        assert_eq!(m.services[&v6].count, 1);
        let slot = |service, slot| socket_addr(&m.backends[&BackendKey { service, slot }]);
        assert_eq!(slot(v4, 0), "10.244.1.1:8080".parse().unwrap());
        assert_eq!(slot(v4, 1), "10.244.1.2:8080".parse().unwrap());
        assert_eq!(slot(v6, 0), "[fd00:10:244::1]:8080".parse().unwrap());
        assert_eq!(m.backends.len(), 3);
    }

    #[test]
    fn a_service_without_endpoints_has_a_frontend_with_no_slots_and_sctp_is_left_out() {
        let d = state(&[
            ("empty", &["10.96.0.11"], Protocol::Udp, &[]),
            ("sctp", &["10.96.0.12"], Protocol::Sctp, &["10.244.1.1"]),
        ]);
        let m = render(&d);
        assert_eq!(m.services.len(), 1);
        assert_eq!(
            m.services[&frontend("10.96.0.11", PROTO_UDP)],
            ServiceValue { count: 0, flags: 0 }
        );
        assert!(m.backends.is_empty());
    }

    #[test]
    fn re_rendering_after_apply_changes_nothing() {
        let mut fake = FakeMaps::default();
        let d = state(&[
            (
                "a",
                &["10.96.0.1"],
                Protocol::Tcp,
                &["10.244.1.1", "10.244.1.2"],
            ),
            ("b", &["10.96.0.2"], Protocol::Udp, &["10.244.1.3"]),
        ]);
        let first = apply(&mut fake, &d);
        assert_eq!(first.ops.len(), 5);
        assert_eq!(fake.contents(), render(&d));
        assert!(diff(&fake.dump().unwrap(), &render(&d)).is_empty());
    }

    #[test]
    fn removing_an_endpoint_writes_only_the_changed_keys_in_a_safe_order() {
        let mut fake = FakeMaps::default();
        let eps = ["10.244.1.1", "10.244.1.2", "10.244.1.3"];
        apply(
            &mut fake,
            &state(&[("a", &["10.96.0.1"], Protocol::Tcp, &eps)]),
        );
        apply(
            &mut fake,
            &state(&[("z", &["10.96.0.9"], Protocol::Tcp, &eps)]),
        );
        let writes = fake.writes();
        // The model keeps slots sticky: 10.244.1.3 moves into the removed endpoint's slot.
        let d = state(&[(
            "z",
            &["10.96.0.9"],
            Protocol::Tcp,
            &["10.244.1.1", "10.244.1.3"],
        )]);
        let plan = apply(&mut fake, &d);
        let z = frontend("10.96.0.9", PROTO_TCP);
        assert_eq!(
            plan.ops,
            vec![
                MapOp::UpsertBackend(
                    BackendKey {
                        service: z,
                        slot: 1
                    },
                    addr_port("10.244.1.3".parse().unwrap(), 8080, 0)
                ),
                MapOp::UpsertService(z, ServiceValue { count: 2, flags: 0 }),
                MapOp::DeleteBackend(BackendKey {
                    service: z,
                    slot: 2
                }),
            ]
        );
        assert_eq!(fake.writes() - writes, 3);
        assert_eq!(fake.contents(), render(&d));
    }

    #[test]
    fn the_fake_rejects_what_a_bpf_hash_map_rejects() {
        let mut fake = FakeMaps::with_capacity(1, 2);
        let d = state(&[
            ("a", &["10.96.0.1"], Protocol::Tcp, &["10.244.1.1"]),
            ("b", &["10.96.0.2"], Protocol::Tcp, &["10.244.1.2"]),
        ]);
        let e = fake
            .apply(&diff(&MapContents::default(), &render(&d)))
            .unwrap_err();
        assert!(e.to_string().contains("E2BIG"), "{e}");
        let e = fake
            .apply(&MapPlan {
                ops: vec![MapOp::DeleteService(frontend("10.96.0.7", PROTO_TCP))],
            })
            .unwrap_err();
        assert!(e.to_string().contains("ENOENT"), "{e}");
        // Replacing an existing key in a full map is fine.
        let mut fake = FakeMaps::with_capacity(1, 1);
        let one = state(&[("a", &["10.96.0.1"], Protocol::Tcp, &["10.244.1.1"])]);
        apply(&mut fake, &one);
        let moved = state(&[("a", &["10.96.0.1"], Protocol::Tcp, &["10.244.1.9"])]);
        apply(&mut fake, &moved);
        assert_eq!(fake.contents(), render(&moved));
    }

    #[test]
    fn a_half_applied_plan_is_repaired_by_diffing_against_what_the_maps_hold() {
        let mut fake = FakeMaps::default();
        let d = state(&[(
            "a",
            &["10.96.0.1"],
            Protocol::Tcp,
            &["10.244.1.1", "10.244.1.2"],
        )]);
        fake.fail_next_apply();
        assert!(fake
            .apply(&diff(&MapContents::default(), &render(&d)))
            .is_err());
        assert_eq!(fake.contents().len(), 1, "one write went through");
        apply(&mut fake, &d);
        assert_eq!(fake.contents(), render(&d));
    }
}
