//! Moves connections off backends that went away: sockets the hooks translated, and the
//! tc path's tracked flows.
//!
//! Sockets: the socket hooks translate a frontend once,
//! at connect(): a connected socket keeps talking to its backend however the EndpointSlice
//! changes, and no conntrack entry exists to flush. So, after a sync that removed
//! backends, every network namespace of the node is searched (sock_diag) for sockets this
//! daemon's hooks translated to such a backend (the socket's cookie and peer are a key of
//! the reverse-translation map, whose value is the frontend), and each is destroyed
//! (`SOCK_DESTROY`, as `ss -K` does): a UDP socket's next send fails (EDESTADDRREQ) or
//! the application reconnects and the hook picks a live backend; a TCP socket gets
//! ECONNABORTED.
//!
//! Which sockets: UDP ones whose backend is no longer serving the frontend (the UDP stale
//! flows nftables mode flushes from conntrack); TCP ones whose backend left the
//! EndpointSlice altogether (a terminating endpoint keeps its connections, as with
//! kube-proxy). [`stale`] decides (pure); the rest talks to the kernel.
//!
//! Flows: a UDP flow from outside sticks to the backend its tc-path forward entry names
//! (the map's equivalent of the conntrack entry nftables mode deletes): the entries of
//! stale flows are deleted ([`stale_flow`]), so the next packet picks a live backend.

use crate::dataplane::conntrack::FlowFilter;
use crate::dataplane::netlink::{self, messages, NetlinkError, NetlinkSocket};
use crate::model::{Protocol, ServiceDelta, ServicePortState};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where `ip netns add` and container runtimes (containerd's `cni-*`) bind-mount network
/// namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Failures talking to the kernel about sockets.
#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    /// A network namespace could not be entered.
    #[error("entering network namespace {path}: {source}")]
    Netns {
        /// The namespace's file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The sock_diag socket failed.
    #[error("sock_diag {op}: {source}")]
    Socket {
        /// `open`, `send` or `recv`.
        op: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The kernel's reply could not be read.
    #[error("sock_diag reply: {0}")]
    Decode(String),
}

impl From<NetlinkError> for SocketsError {
    fn from(e: NetlinkError) -> Self {
        match e {
            NetlinkError::Open(source) => SocketsError::Socket { op: "open", source },
            NetlinkError::Socket { op, source } => SocketsError::Socket { op, source },
            NetlinkError::Decode(m) => SocketsError::Decode(m),
        }
    }
}

/// A socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The kernel's socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Its peer: the backend, for a socket the hooks translated.
    pub peer: SocketAddr,
    id: SocketId,
}

/// The TCP sockets a changed port calls for: per frontend of either version, the
/// endpoints it no longer has that `listed` says left the EndpointSlices altogether (a
/// terminating endpoint keeps its connections, as kube-proxy leaves them).
pub fn gone_tcp_filters(d: &ServiceDelta, listed: impl Fn(SocketAddr) -> bool) -> Vec<FlowFilter> {
    if d.name.protocol != Protocol::Tcp {
        return Vec::new();
    }
    let addrs = |sp: &Option<ServicePortState>| -> BTreeSet<SocketAddr> {
        sp.iter()
            .flat_map(|sp| sp.endpoints.iter().chain(&sp.local_endpoints))
            .map(|e| SocketAddr::new(e.ip, e.port))
            .collect()
    };
    let (old, new) = (addrs(&d.old), addrs(&d.new));
    let mut fronts: BTreeSet<(Option<std::net::IpAddr>, u16)> = BTreeSet::new();
    for sp in d.old.iter().chain(d.new.iter()) {
        let i = &sp.info;
        for ip in i
            .cluster_ips
            .iter()
            .chain(&i.external_ips)
            .chain(&i.load_balancer_ips)
        {
            fronts.insert((Some(*ip), i.port));
        }
        if let Some(np) = i.node_port {
            fronts.insert((None, np));
        }
    }
    let mut out = Vec::new();
    for gone in old.difference(&new).filter(|a| !listed(**a)) {
        for &(ip, port) in &fronts {
            if ip.is_some_and(|ip| ip.is_ipv4() != gone.is_ipv4()) {
                continue;
            }
            out.push(FlowFilter {
                protocol: Protocol::Tcp,
                orig_dst: ip,
                orig_dport: Some(port),
                reply_src: Some(gone.ip()),
                reply_sport: Some(gone.port()),
            });
        }
    }
    out
}

/// The backends whose sockets go: `(protocol, backend)` of every filter naming one.
/// Filters without an endpoint (the flows of a port that had none) select no socket: no
/// socket was translated while a frontend had no backend.
pub fn stale_backends(filters: &[FlowFilter]) -> BTreeSet<(Protocol, SocketAddr)> {
    filters
        .iter()
        .filter_map(|f| Some((f.protocol, SocketAddr::new(f.reply_src?, f.reply_sport?))))
        .collect()
}

/// Whether a connection of `protocol` translated from `frontend` to `backend` is one
/// `filters` select.
pub fn stale(
    filters: &[FlowFilter],
    protocol: Protocol,
    backend: SocketAddr,
    frontend: SocketAddr,
) -> bool {
    filters.iter().any(|f| {
        f.protocol == protocol
            && f.reply_src == Some(backend.ip())
            && f.reply_sport == Some(backend.port())
            && f.orig_dst.is_none_or(|d| d == frontend.ip())
            && f.orig_dport.is_none_or(|p| p == frontend.port())
    })
}

/// Whether the tc path's entry `key` -> `value` is the forward entry of a flow `filters`
/// select (its destination is the frontend, its value the backend).
pub fn stale_flow(
    filters: &[FlowFilter],
    key: &weir_ebpf_common::CtKey,
    value: &weir_ebpf_common::CtValue,
) -> bool {
    use super::render::socket_addr;
    use weir_ebpf_common::{AddrPort, CT_FORWARD, PROTO_TCP, PROTO_UDP};
    if key.dir != CT_FORWARD {
        return false;
    }
    let protocol = match key.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => return false,
    };
    let at = |addr: [u32; 4], port: u16| {
        socket_addr(&AddrPort {
            addr,
            port,
            family: key.family,
            proto: 0,
        })
    };
    stale(
        filters,
        protocol,
        at(value.addr, value.port),
        at(key.daddr, key.dport),
    )
}

/// The network namespaces to search: this process's, then every one bind-mounted under
/// `dir`, each once (by device and inode).
pub fn network_namespaces(dir: &Path) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let own = PathBuf::from("/proc/self/ns/net");
    let mut candidates = vec![own];
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        candidates.extend(more);
    }
    for p in candidates {
        if let Ok(m) = std::fs::metadata(&p) {
            if seen.insert((m.dev(), m.ino())) {
                out.push(p);
            }
        }
    }
    out
}

/// Runs `f` on a thread of its own inside the network namespace `path` (the thread ends
/// with it, so no other work runs in that namespace).
pub fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, SocketsError> + Send,
) -> Result<T, SocketsError> {
    netlink::in_netns(path, f).unwrap_or_else(|source| {
        Err(SocketsError::Netns {
            path: path.to_owned(),
            source,
        })
    })
}

/// A sock_diag socket of the current thread's network namespace.
pub struct SockDiag {
    nl: NetlinkSocket,
}

const RX_BUFFER: usize = 64 * 1024;

impl SockDiag {
    /// Opens one (destroying needs `CAP_NET_ADMIN`).
    pub fn open() -> Result<SockDiag, SocketsError> {
        Ok(SockDiag {
            nl: NetlinkSocket::open(NETLINK_SOCK_DIAG, RX_BUFFER)?,
        })
    }

    /// The connected sockets of one protocol whose peer is in `peers` (both families).
    pub fn connected_to(
        &mut self,
        protocol: Protocol,
        peers: &BTreeSet<(Protocol, SocketAddr)>,
    ) -> Result<Vec<DiagSocket>, SocketsError> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let request = inet_request(protocol, v6, socket_id(v6));
            for reply in self.exchange(SockDiagMessage::InetRequest(request), NLM_F_DUMP)? {
                let SockDiagMessage::InetResponse(r) = reply else {
                    continue;
                };
                let id = r.header.socket_id;
                let peer = SocketAddr::new(id.destination_address, id.destination_port);
                if !peers.contains(&(protocol, peer)) {
                    continue;
                }
                out.push(DiagSocket {
                    protocol,
                    cookie: u64::from_ne_bytes(id.cookie),
                    peer,
                    id,
                });
            }
        }
        Ok(out)
    }

    /// Destroys one socket (`SOCK_DESTROY`); one already gone is not an error.
    pub fn destroy(&mut self, s: &DiagSocket) -> Result<(), SocketsError> {
        let v6 = s.peer.is_ipv6();
        let request = inet_request(s.protocol, v6, s.id.clone());
        let mut buf = Vec::new();
        let seq = self.nl.append(
            &mut buf,
            NLM_F_REQUEST | NLM_F_ACK,
            NetlinkPayload::from(SockDiagDestroy::new(SockDiagMessage::InetRequest(request))),
        );
        self.nl.send(&buf)?;
        loop {
            let rx = self.nl.recv()?;
            for bytes in messages(rx)? {
                let reply = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                    .map_err(|e| SocketsError::Decode(e.to_string()))?;
                if reply.header.sequence_number != seq {
                    continue;
                }
                if let NetlinkPayload::Error(e) = reply.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(c) if -c.get() == libc::ENOENT => Ok(()),
                        Some(c) => Err(SocketsError::Socket {
                            op: "destroy",
                            source: io::Error::from_raw_os_error(-c.get()),
                        }),
                    };
                }
            }
        }
    }

    /// Sends a request, returns the replies up to the end of the dump.
    fn exchange(
        &mut self,
        request: SockDiagMessage,
        flags: u16,
    ) -> Result<Vec<SockDiagMessage>, SocketsError> {
        let mut buf = Vec::new();
        let seq = self.nl.append(
            &mut buf,
            NLM_F_REQUEST | flags,
            NetlinkPayload::from(request),
        );
        self.nl.send(&buf)?;
        let mut out = Vec::new();
        loop {
            let rx = self.nl.recv()?;
            for bytes in messages(rx)? {
                let reply = match NetlinkMessage::<SockDiagMessage>::deserialize(bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "skipping an undecodable sock_diag reply");
                        continue;
                    }
                };
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return Err(SocketsError::Socket {
                            op: "dump",
                            source: e
                                .code
                                .map(|c| io::Error::from_raw_os_error(-c.get()))
                                .unwrap_or_else(|| io::Error::other("unexpected ack")),
                        })
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

fn socket_id(v6: bool) -> SocketId {
    if v6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    }
}

fn inet_request(protocol: Protocol, v6: bool, socket_id: SocketId) -> InetRequest {
    InetRequest {
        family: if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8,
        protocol: protocol.number(),
        extensions: ExtensionFlags::empty(),
        // Every state: a connected UDP socket reports ESTABLISHED, TCP ones any.
        states: StateFlags::all(),
        socket_id,
    }
}

/// What one search found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Network namespaces searched.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub sockets: usize,
    /// The tc path's forward entries deleted.
    pub flows: usize,
}

/// Searches every namespace (see [`network_namespaces`]) for sockets `filters` select and
/// destroys them. `frontend_of(cookie, peer)` reads the reverse-translation map: the
/// frontend the hooks translated that socket from, `None` for a socket they did not
/// translate (it connected to the backend's address itself, and stays). A namespace that
/// vanished meanwhile is skipped.
pub fn destroy_stale(
    filters: &[FlowFilter],
    netns_dir: &Path,
    frontend_of: &(dyn Fn(u64, SocketAddr) -> Option<SocketAddr> + Sync),
) -> Result<Destroyed, SocketsError> {
    let peers = stale_backends(filters);
    let mut done = Destroyed::default();
    if peers.is_empty() {
        return Ok(done);
    }
    let protocols: BTreeSet<Protocol> = peers.iter().map(|(p, _)| *p).collect();
    for ns in network_namespaces(netns_dir) {
        let found = in_netns(&ns, || {
            let mut diag = SockDiag::open()?;
            let mut destroyed = 0;
            for p in &protocols {
                for s in diag.connected_to(*p, &peers)? {
                    let Some(front) = frontend_of(s.cookie, s.peer) else {
                        continue;
                    };
                    if stale(filters, s.protocol, s.peer, front) {
                        diag.destroy(&s)?;
                        tracing::debug!(
                            socket = s.cookie,
                            backend = %s.peer,
                            frontend = %front,
                            "destroyed a socket of a removed backend"
                        );
                        destroyed += 1;
                    }
                }
            }
            Ok(destroyed)
        });
        match found {
            Ok(n) => {
                done.namespaces += 1;
                done.sockets += n;
            }
            Err(SocketsError::Netns { path, source }) => {
                tracing::debug!(netns = %path.display(), error = %source, "skipping a network namespace");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(proto: Protocol, front: Option<&str>, port: u16, ep: Option<&str>) -> FlowFilter {
        let ep: Option<SocketAddr> = ep.map(|e| e.parse().unwrap());
        FlowFilter {
            protocol: proto,
            orig_dst: front.map(|f| f.parse().unwrap()),
            orig_dport: Some(port),
            reply_src: ep.map(|e| e.ip()),
            reply_sport: ep.map(|e| e.port()),
        }
    }

    #[test]
    fn a_socket_is_stale_when_its_frontend_and_backend_are_a_filters() {
        let f = [filter(
            Protocol::Udp,
            Some("10.96.0.53"),
            53,
            Some("10.244.1.12:5353"),
        )];
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let (udp, tcp) = (Protocol::Udp, Protocol::Tcp);
        let backend = a("10.244.1.12:5353");
        assert!(stale(&f, udp, backend, a("10.96.0.53:53")));
        // Another frontend with the same backend keeps it.
        assert!(!stale(&f, udp, backend, a("10.96.0.54:53")));
        // Another backend, or TCP to the same one, stays.
        assert!(!stale(&f, udp, a("10.244.1.11:5353"), a("10.96.0.53:53")));
        assert!(!stale(&f, tcp, backend, a("10.96.0.53:53")));
        // A NodePort filter (no frontend address) matches its port on any address.
        let np = [filter(Protocol::Udp, None, 30053, Some("10.244.1.12:5353"))];
        assert!(stale(&np, udp, backend, a("192.168.1.1:30053")));
        assert!(!stale(&np, udp, backend, a("192.168.1.1:53")));
    }

    #[test]
    fn a_forward_entry_to_a_stale_backend_is_stale_and_reply_entries_are_not() {
        use super::super::render::addr_port;
        use weir_ebpf_common::{CtKey, CtValue, CT_FORWARD, CT_REPLY, FAMILY_V4, PROTO_UDP};
        let f = [filter(Protocol::Udp, None, 30053, Some("10.244.1.12:5353"))];
        let client = addr_port("198.51.100.2".parse().unwrap(), 40100, 0);
        let front = addr_port("192.168.77.10".parse().unwrap(), 30053, 0);
        let key = CtKey {
            saddr: client.addr,
            daddr: front.addr,
            sport: client.port,
            dport: front.port,
            proto: PROTO_UDP,
            dir: CT_FORWARD,
            family: FAMILY_V4,
            pad: 0,
        };
        let to = |b: &str, port: u16| {
            let b = addr_port(b.parse().unwrap(), port, 0);
            CtValue {
                addr: b.addr,
                port: b.port,
                ..CtValue::default()
            }
        };
        assert!(stale_flow(&f, &key, &to("10.244.1.12", 5353)));
        assert!(!stale_flow(&f, &key, &to("10.244.1.11", 5353)));
        let reply = CtKey {
            dir: CT_REPLY,
            ..key
        };
        assert!(!stale_flow(&f, &reply, &to("10.244.1.12", 5353)));
    }

    #[test]
    fn filters_without_an_endpoint_select_no_backend() {
        let f = [
            filter(Protocol::Udp, Some("10.96.0.53"), 53, None),
            filter(
                Protocol::Tcp,
                Some("10.96.0.10"),
                80,
                Some("10.244.1.10:8080"),
            ),
        ];
        let b = stale_backends(&f);
        assert_eq!(
            b.into_iter().collect::<Vec<_>>(),
            vec![(Protocol::Tcp, "10.244.1.10:8080".parse().unwrap())]
        );
    }

    fn tcp_port(eps: &[&str]) -> ServicePortState {
        use crate::model::{Endpoint, ServiceInfo, ServicePortName};
        let name = ServicePortName {
            namespace: "ns".into(),
            name: "web".into(),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        let info = ServiceInfo {
            node_port: Some(30080),
            ..ServiceInfo::new(name, vec!["10.96.0.10".parse().unwrap()], 80)
        };
        let all = eps
            .iter()
            .map(|e| Endpoint {
                ip: e.parse().unwrap(),
                port: 8080,
                is_local: false,
            })
            .collect();
        ServicePortState::from_endpoints(info, all)
    }

    #[test]
    fn tcp_sockets_go_only_with_endpoints_gone_from_the_slices() {
        let d = ServiceDelta {
            name: tcp_port(&[]).info.name.clone(),
            old: Some(tcp_port(&["10.244.1.10", "10.244.1.11"])),
            new: Some(tcp_port(&["10.244.1.10"])),
        };
        let gone = gone_tcp_filters(&d, |_| false);
        let targets: BTreeSet<(Option<String>, Option<u16>, String)> = gone
            .iter()
            .map(|f| {
                (
                    f.orig_dst.map(|a| a.to_string()),
                    f.orig_dport,
                    SocketAddr::new(f.reply_src.unwrap(), f.reply_sport.unwrap()).to_string(),
                )
            })
            .collect();
        assert_eq!(
            targets.into_iter().collect::<Vec<_>>(),
            vec![
                (None, Some(30080), "10.244.1.11:8080".to_owned()),
                (
                    Some("10.96.0.10".to_owned()),
                    Some(80),
                    "10.244.1.11:8080".to_owned()
                ),
            ]
        );
        // Still in a slice (terminating): its connections stay.
        assert!(gone_tcp_filters(&d, |_| true).is_empty());
        // UDP is the stale-flow filters' business.
        let mut udp = d.clone();
        udp.name.protocol = Protocol::Udp;
        assert!(gone_tcp_filters(&udp, |_| false).is_empty());
    }

    #[test]
    fn netlink_messages_are_split_at_their_aligned_lengths() {
        let mut buf = vec![0u8; 40];
        buf[0] = 18; // 18 bytes, padded to 20
        buf[20] = 20;
        let m = messages(&buf).unwrap();
        assert_eq!(m.iter().map(|m| m.len()).collect::<Vec<_>>(), vec![18, 20]);
        buf[20] = 200;
        assert!(messages(&buf).is_err());
    }

    #[test]
    fn this_process_namespace_comes_first_and_once() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", dir.path().join("same")).unwrap();
        let found = network_namespaces(dir.path());
        assert_eq!(found, vec![PathBuf::from("/proc/self/ns/net")]);
        assert_eq!(network_namespaces(Path::new("/nonexistent")).len(), 1);
    }
}
