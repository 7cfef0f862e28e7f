//! IPVS through generic netlink: the family `IPVS` is resolved through `nlctrl`, then
//! services and destinations are added, changed, deleted and dumped with `IPVS_CMD_*`.
//!
//! Attribute layout (from the kernel's `include/uapi/linux/ip_vs.h`): a request carries
//! `IPVS_CMD_ATTR_SERVICE` (nested: AF, PROTOCOL, ADDR, PORT in network byte order,
//! SCHED_NAME, FLAGS as `{flags, mask}`, TIMEOUT, NETMASK) and, for destination commands,
//! `IPVS_CMD_ATTR_DEST` (nested: ADDR, PORT, FWD_METHOD, WEIGHT, U_THRESH, L_THRESH,
//! ADDR_FAMILY). Dumps answer one message per object with the same nesting. The message
//! framing is `netlink-packet-generic`'s; [`Attr`] is a small attribute tree of our own.

use super::{
    IpvsBackend, IpvsError, IpvsState, Op, RealServer, ServiceKey, ServiceState, Timeouts,
    VirtualServer,
};
use crate::dataplane::netlink::{messages, NetlinkError, NetlinkSocket};
use crate::model::Protocol;
use netlink_packet_core::{
    DecodeError, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer,
    NlasIterator, ParseableParametrized, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::protocols::NETLINK_GENERIC;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `IPVS_GENL_NAME`.
pub const FAMILY_NAME: &str = "IPVS";
const GENL_VERSION: u8 = 1;

/// `IPVS_CMD_*`.
#[allow(missing_docs)]
pub mod cmd {
    pub const NEW_SERVICE: u8 = 1;
    pub const SET_SERVICE: u8 = 2;
    pub const DEL_SERVICE: u8 = 3;
    pub const GET_SERVICE: u8 = 4;
    pub const NEW_DEST: u8 = 5;
    pub const SET_DEST: u8 = 6;
    pub const DEL_DEST: u8 = 7;
    pub const GET_DEST: u8 = 8;
    pub const SET_CONFIG: u8 = 12;
    pub const GET_CONFIG: u8 = 13;
}

const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;

const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`.
const F_PERSISTENT: u32 = 0x1;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding.
const FWD_MASQ: u32 = 0;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const RX_BUFFER: usize = 64 * 1024;

/// Requests sent in one datagram before their acknowledgements are read (each comes back
/// as its own datagram): few enough that a batch's acknowledgements, error ones with the
/// request echoed, fit the socket's default receive buffer.
const BATCH: usize = 64;

/// A netlink attribute: a value or nested attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    /// Raw bytes (integers already encoded in their byte order).
    Bytes(u16, Vec<u8>),
    /// Nested attributes.
    Nested(u16, Vec<Attr>),
}

impl Attr {
    fn u16_ne(kind: u16, v: u16) -> Attr {
        Attr::Bytes(kind, v.to_ne_bytes().to_vec())
    }
    fn u16_be(kind: u16, v: u16) -> Attr {
        Attr::Bytes(kind, v.to_be_bytes().to_vec())
    }
    fn u32_ne(kind: u16, v: u32) -> Attr {
        Attr::Bytes(kind, v.to_ne_bytes().to_vec())
    }
    fn string(kind: u16, s: &str) -> Attr {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        Attr::Bytes(kind, b)
    }

    /// Parses attributes; those with the nested flag (or listed in `nested`) recurse.
    pub fn parse_all(buf: &[u8], nested: &[u16]) -> Result<Vec<Attr>, DecodeError> {
        let mut out = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla: NlaBuffer<&[u8]> = nla?;
            let kind = nla.kind() & NLA_TYPE_MASK;
            if nla.nested_flag() || nested.contains(&kind) {
                out.push(Attr::Nested(kind, Attr::parse_all(nla.value(), &[])?));
            } else {
                out.push(Attr::Bytes(kind, nla.value().to_vec()));
            }
        }
        Ok(out)
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Attr::Bytes(_, b) => b.len(),
            Attr::Nested(_, a) => a.as_slice().buffer_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            Attr::Bytes(k, _) => *k,
            Attr::Nested(k, _) => *k | NLA_F_NESTED,
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Attr::Bytes(_, b) => buffer[..b.len()].copy_from_slice(b),
            Attr::Nested(_, a) => a.as_slice().emit(buffer),
        }
    }
}

/// An IPVS generic netlink message: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    /// `IPVS_CMD_*`.
    pub cmd: u8,
    /// Top-level attributes.
    pub attrs: Vec<Attr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(IpvsMessage {
            cmd: header.cmd,
            attrs: Attr::parse_all(buf, &[CMD_ATTR_SERVICE, CMD_ATTR_DEST])?,
        })
    }
}

fn af(ip: &IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The attributes that identify a virtual server.
fn service_id(key: &ServiceKey) -> Vec<Attr> {
    vec![
        Attr::u16_ne(SVC_AF, af(&key.addr)),
        Attr::u16_ne(SVC_PROTOCOL, key.protocol.number() as u16),
        Attr::Bytes(SVC_ADDR, addr_bytes(&key.addr)),
        Attr::u16_be(SVC_PORT, key.port),
    ]
}

/// A full virtual server (NEW/SET_SERVICE need scheduler, flags, timeout and netmask).
pub fn service_attrs(s: &VirtualServer) -> Attr {
    let mut a = service_id(&s.key);
    let flags = if s.persistent_timeout.is_some() {
        F_PERSISTENT
    } else {
        0
    };
    let mut fm = flags.to_ne_bytes().to_vec();
    fm.extend_from_slice(&u32::MAX.to_ne_bytes());
    let netmask: u32 = if s.key.addr.is_ipv4() { u32::MAX } else { 128 };
    a.extend([
        Attr::string(SVC_SCHED_NAME, &s.scheduler),
        Attr::Bytes(SVC_FLAGS, fm),
        Attr::u32_ne(SVC_TIMEOUT, s.persistent_timeout.unwrap_or(0)),
        Attr::u32_ne(SVC_NETMASK, netmask),
    ]);
    Attr::Nested(CMD_ATTR_SERVICE, a)
}

/// A full real server (NEW/SET_DEST), NAT forwarding.
pub fn dest_attrs(d: &RealServer) -> Attr {
    let ip = d.addr.ip();
    Attr::Nested(
        CMD_ATTR_DEST,
        vec![
            Attr::Bytes(DEST_ADDR, addr_bytes(&ip)),
            Attr::u16_be(DEST_PORT, d.addr.port()),
            Attr::u32_ne(DEST_FWD_METHOD, FWD_MASQ),
            Attr::u32_ne(DEST_WEIGHT, d.weight),
            Attr::u32_ne(DEST_U_THRESH, 0),
            Attr::u32_ne(DEST_L_THRESH, 0),
            Attr::u16_ne(DEST_ADDR_FAMILY, af(&ip)),
        ],
    )
}

/// The request for one operation: command, attributes and a description for errors.
pub fn request(op: &Op) -> (IpvsMessage, &'static str, String) {
    let svc = |k: &ServiceKey| Attr::Nested(CMD_ATTR_SERVICE, service_id(k));
    let (cmd, name, attrs, target) = match op {
        Op::AddService(s) => (
            cmd::NEW_SERVICE,
            "IPVS_CMD_NEW_SERVICE",
            vec![service_attrs(s)],
            format!("{} ({})", s.key, s.scheduler),
        ),
        Op::UpdateService(s) => (
            cmd::SET_SERVICE,
            "IPVS_CMD_SET_SERVICE",
            vec![service_attrs(s)],
            format!("{} ({})", s.key, s.scheduler),
        ),
        Op::DelService(k) => (
            cmd::DEL_SERVICE,
            "IPVS_CMD_DEL_SERVICE",
            vec![svc(k)],
            k.to_string(),
        ),
        Op::AddDest(k, d) => (
            cmd::NEW_DEST,
            "IPVS_CMD_NEW_DEST",
            vec![svc(k), dest_attrs(d)],
            format!("{k} -> {}", d.addr),
        ),
        Op::UpdateDest(k, d) => (
            cmd::SET_DEST,
            "IPVS_CMD_SET_DEST",
            vec![svc(k), dest_attrs(d)],
            format!("{k} -> {} weight {}", d.addr, d.weight),
        ),
        Op::DelDest(k, a) => {
            let ip = a.ip();
            (
                cmd::DEL_DEST,
                "IPVS_CMD_DEL_DEST",
                vec![
                    svc(k),
                    Attr::Nested(
                        CMD_ATTR_DEST,
                        vec![
                            Attr::Bytes(DEST_ADDR, addr_bytes(&ip)),
                            Attr::u16_be(DEST_PORT, a.port()),
                            Attr::u16_ne(DEST_ADDR_FAMILY, af(&ip)),
                        ],
                    ),
                ],
                format!("{k} -> {a}"),
            )
        }
    };
    (IpvsMessage { cmd, attrs }, name, target)
}

/// `IPVS_CMD_SET_CONFIG` with the timeouts that are not 0 (the kernel keeps the others).
pub fn set_config_request(t: &Timeouts) -> IpvsMessage {
    let attrs = [
        (CMD_ATTR_TIMEOUT_TCP, t.tcp),
        (CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin),
        (CMD_ATTR_TIMEOUT_UDP, t.udp),
    ]
    .into_iter()
    .filter(|(_, v)| *v != 0)
    .map(|(k, v)| Attr::u32_ne(k, v))
    .collect();
    IpvsMessage {
        cmd: cmd::SET_CONFIG,
        attrs,
    }
}

/// The timeouts of an `IPVS_CMD_GET_CONFIG` reply.
pub fn parse_config(attrs: &[Attr]) -> Timeouts {
    Timeouts {
        tcp: get_u32(attrs, CMD_ATTR_TIMEOUT_TCP).unwrap_or(0),
        tcp_fin: get_u32(attrs, CMD_ATTR_TIMEOUT_TCP_FIN).unwrap_or(0),
        udp: get_u32(attrs, CMD_ATTR_TIMEOUT_UDP).unwrap_or(0),
    }
}

fn find(attrs: &[Attr], kind: u16) -> Option<&Attr> {
    attrs.iter().find(|a| match a {
        Attr::Bytes(k, _) | Attr::Nested(k, _) => *k == kind,
    })
}

fn bytes(attrs: &[Attr], kind: u16) -> Option<&[u8]> {
    match find(attrs, kind)? {
        Attr::Bytes(_, b) => Some(b),
        Attr::Nested(..) => None,
    }
}

fn get_u16_ne(attrs: &[Attr], kind: u16) -> Option<u16> {
    bytes(attrs, kind)?
        .get(..2)?
        .try_into()
        .ok()
        .map(u16::from_ne_bytes)
}

fn get_u16_be(attrs: &[Attr], kind: u16) -> Option<u16> {
    bytes(attrs, kind)?
        .get(..2)?
        .try_into()
        .ok()
        .map(u16::from_be_bytes)
}

fn get_u32(attrs: &[Attr], kind: u16) -> Option<u32> {
    bytes(attrs, kind)?
        .get(..4)?
        .try_into()
        .ok()
        .map(u32::from_ne_bytes)
}

fn get_addr(attrs: &[Attr], kind: u16, family: u16) -> Option<IpAddr> {
    let b = bytes(attrs, kind)?;
    if family == libc::AF_INET as u16 {
        let o: [u8; 4] = b.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(o)))
    } else {
        let o: [u8; 16] = b.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(o)))
    }
}

/// A dumped virtual server (`None` for what weir does not manage: fwmark services,
/// protocols other than TCP/UDP/SCTP).
pub fn parse_service(attrs: &[Attr]) -> Option<VirtualServer> {
    let Some(Attr::Nested(_, s)) = find(attrs, CMD_ATTR_SERVICE) else {
        return None;
    };
    let family = get_u16_ne(s, SVC_AF)?;
    let protocol = Protocol::from_number(get_u16_ne(s, SVC_PROTOCOL)? as u8)?;
    let addr = get_addr(s, SVC_ADDR, family)?;
    let port = get_u16_be(s, SVC_PORT)?;
    let scheduler = bytes(s, SVC_SCHED_NAME)
        .map(|b| String::from_utf8_lossy(b).trim_end_matches('\0').to_owned())
        .unwrap_or_default();
    let flags = get_u32(s, SVC_FLAGS).unwrap_or(0);
    let timeout = get_u32(s, SVC_TIMEOUT).unwrap_or(0);
    Some(VirtualServer {
        key: ServiceKey {
            addr,
            protocol,
            port,
        },
        scheduler,
        persistent_timeout: (flags & F_PERSISTENT != 0).then_some(timeout),
    })
}

/// A dumped real server.
pub fn parse_dest(attrs: &[Attr], service_family: u16) -> Option<RealServer> {
    let Some(Attr::Nested(_, d)) = find(attrs, CMD_ATTR_DEST) else {
        return None;
    };
    let family = get_u16_ne(d, DEST_ADDR_FAMILY).unwrap_or(service_family);
    let ip = get_addr(d, DEST_ADDR, family)?;
    let port = get_u16_be(d, DEST_PORT)?;
    Some(RealServer {
        addr: std::net::SocketAddr::new(ip, port),
        weight: get_u32(d, DEST_WEIGHT).unwrap_or(0),
        active_conns: get_u32(d, DEST_ACTIVE_CONNS).unwrap_or(0),
        inactive_conns: get_u32(d, DEST_INACT_CONNS).unwrap_or(0),
    })
}

/// IPVS of the network namespace the socket was opened in.
pub struct KernelIpvs {
    nl: NetlinkSocket,
    family_id: u16,
}

impl std::fmt::Debug for KernelIpvs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelIpvs")
            .field("family_id", &self.family_id)
            .finish()
    }
}

impl KernelIpvs {
    /// Opens a generic netlink socket and resolves the `IPVS` family.
    pub fn open() -> Result<KernelIpvs, IpvsError> {
        let mut k = KernelIpvs {
            nl: NetlinkSocket::open(NETLINK_GENERIC, RX_BUFFER)?,
            family_id: 0,
        };
        k.family_id = k.resolve_family()?;
        Ok(k)
    }

    fn send<F>(&mut self, payload: GenlMessage<F>, flags: u16) -> Result<u32, IpvsError>
    where
        F: GenlFamily + Emitable + std::fmt::Debug,
    {
        let mut buf = Vec::new();
        let seq = self.append(&mut buf, payload, flags);
        self.nl.send(&buf)?;
        Ok(seq)
    }

    /// Appends one request to a datagram being built; returns its sequence number.
    fn append<F>(&mut self, buf: &mut Vec<u8>, payload: GenlMessage<F>, flags: u16) -> u32
    where
        F: GenlFamily + Emitable + std::fmt::Debug,
    {
        let seq = self.nl.next_seq();
        frame(buf, payload, flags, seq);
        seq
    }

    /// Sends a batch of operations in one datagram and reads their acknowledgements in
    /// order (the kernel handles a datagram's requests one after the other).
    fn apply_batch(&mut self, ops: &[Op], out: &mut Vec<Result<(), IpvsError>>) {
        let mut buf = Vec::new();
        let mut sent = Vec::with_capacity(ops.len());
        for op in ops {
            let (m, name, target) = request(op);
            let g = self.ipvs(m);
            let seq = self.append(&mut buf, g, NLM_F_REQUEST | NLM_F_ACK);
            sent.push((seq, name, target));
        }
        if let Err(e) = self.nl.send(&buf) {
            let kind = match e {
                NetlinkError::Socket { source, .. } => source.kind(),
                _ => io::ErrorKind::Other,
            };
            out.extend(sent.iter().map(|_| {
                Err(IpvsError::Socket {
                    op: "send",
                    source: io::Error::from(kind),
                })
            }));
            return;
        }
        for (i, (seq, op, target)) in sent.into_iter().enumerate() {
            match self.replies::<IpvsMessage>(seq, |_| {}) {
                Ok(Ok(())) => out.push(Ok(())),
                Ok(Err(source)) => out.push(Err(IpvsError::Refused { op, target, source })),
                Err(e) => {
                    // The socket failed: this and the rest of the batch are unknown.
                    let left = ops.len() - i;
                    out.push(Err(e));
                    out.extend((1..left).map(|_| {
                        Err(IpvsError::Decode(
                            "no acknowledgement read after a socket error".into(),
                        ))
                    }));
                    return;
                }
            }
        }
    }

    /// Receives the replies to `seq` until the ack or the end of the dump, handing each
    /// data message to `each`. An error reply becomes `Err(errno)`.
    fn replies<F>(
        &mut self,
        seq: u32,
        mut each: impl FnMut(F),
    ) -> Result<Result<(), io::Error>, IpvsError>
    where
        F: ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
    {
        loop {
            let rx = self.nl.recv()?;
            for bytes in messages(rx)? {
                let msg = NetlinkMessage::<GenlMessage<F>>::deserialize(bytes)
                    .map_err(|e| IpvsError::Decode(e.to_string()))?;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(Ok(())),
                    NetlinkPayload::Error(e) => {
                        return Ok(match e.code {
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            None => Ok(()),
                        })
                    }
                    NetlinkPayload::InnerMessage(m) => each(m.payload),
                    _ => {}
                }
            }
        }
    }

    fn resolve_family(&mut self) -> Result<u16, IpvsError> {
        let msg = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.to_owned())],
        });
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK)?;
        let mut id = None;
        let res = self.replies::<GenlCtrl>(seq, |m| {
            for a in m.nlas {
                if let GenlCtrlAttrs::FamilyId(i) = a {
                    id = Some(i);
                }
            }
        })?;
        res.map_err(|e| IpvsError::NoFamily(e.to_string()))?;
        id.ok_or_else(|| IpvsError::NoFamily("nlctrl answered without a family id".into()))
    }

    fn ipvs(&self, m: IpvsMessage) -> GenlMessage<IpvsMessage> {
        let mut g = GenlMessage::from_payload(m);
        g.set_resolved_family_id(self.family_id);
        g
    }

    /// Sets the connection timeouts that are not 0 (`IPVS_CMD_SET_CONFIG`).
    pub fn set_timeouts(&mut self, t: &Timeouts) -> Result<(), IpvsError> {
        let m = set_config_request(t);
        if m.attrs.is_empty() {
            return Ok(());
        }
        let g = self.ipvs(m);
        let seq = self.send(g, NLM_F_REQUEST | NLM_F_ACK)?;
        self.replies::<IpvsMessage>(seq, |_| {})?
            .map_err(|source| IpvsError::Refused {
                op: "IPVS_CMD_SET_CONFIG",
                target: format!("{t:?}"),
                source,
            })
    }

    /// The connection timeouts in force (`IPVS_CMD_GET_CONFIG`).
    pub fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let g = self.ipvs(IpvsMessage {
            cmd: cmd::GET_CONFIG,
            attrs: Vec::new(),
        });
        let seq = self.send(g, NLM_F_REQUEST | NLM_F_ACK)?;
        let mut out = None;
        self.replies::<IpvsMessage>(seq, |m| out = Some(parse_config(&m.attrs)))?
            .map_err(|source| IpvsError::Refused {
                op: "IPVS_CMD_GET_CONFIG",
                target: String::new(),
                source,
            })?;
        out.ok_or_else(|| IpvsError::Decode("IPVS_CMD_GET_CONFIG answered nothing".into()))
    }

    fn dump_cmd(&mut self, m: IpvsMessage) -> Result<Vec<IpvsMessage>, IpvsError> {
        let what = if m.cmd == cmd::GET_SERVICE {
            "IPVS_CMD_GET_SERVICE"
        } else {
            "IPVS_CMD_GET_DEST"
        };
        let g = self.ipvs(m);
        let seq = self.send(g, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.replies::<IpvsMessage>(seq, |m| out.push(m))?
            .map_err(|source| IpvsError::Refused {
                op: what,
                target: "dump".into(),
                source,
            })?;
        Ok(out)
    }
}

/// Appends one netlink message (`payload` with `flags` and `seq`) to the datagram in `buf`,
/// on the 4-byte boundary the kernel expects between messages.
fn frame<F>(buf: &mut Vec<u8>, payload: GenlMessage<F>, flags: u16, seq: u32)
where
    F: GenlFamily + Emitable + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    crate::dataplane::netlink::frame(
        buf,
        NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload)),
    );
}

impl IpvsBackend for KernelIpvs {
    fn dump(&mut self) -> Result<IpvsState, IpvsError> {
        let mut state = IpvsState::new();
        let services = self.dump_cmd(IpvsMessage {
            cmd: cmd::GET_SERVICE,
            attrs: Vec::new(),
        })?;
        for m in services {
            let Some(server) = parse_service(&m.attrs) else {
                continue;
            };
            let family = af(&server.key.addr);
            let dests = self.dump_cmd(IpvsMessage {
                cmd: cmd::GET_DEST,
                attrs: vec![Attr::Nested(CMD_ATTR_SERVICE, service_id(&server.key))],
            })?;
            let dests: BTreeMap<_, _> = dests
                .iter()
                .filter_map(|d| parse_dest(&d.attrs, family))
                .map(|d| (d.addr, d))
                .collect();
            state.insert(server.key, ServiceState { server, dests });
        }
        Ok(state)
    }

    fn read_service(&mut self, key: &ServiceKey) -> Result<Option<ServiceState>, IpvsError> {
        let g = self.ipvs(IpvsMessage {
            cmd: cmd::GET_SERVICE,
            attrs: vec![Attr::Nested(CMD_ATTR_SERVICE, service_id(key))],
        });
        let seq = self.send(g, NLM_F_REQUEST | NLM_F_ACK)?;
        let mut server = None;
        let answer = self.replies::<IpvsMessage>(seq, |m| server = parse_service(&m.attrs))?;
        match answer {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(source) => {
                return Err(IpvsError::Refused {
                    op: "IPVS_CMD_GET_SERVICE",
                    target: key.to_string(),
                    source,
                })
            }
            Ok(()) => {}
        }
        let Some(server) = server else {
            return Ok(None);
        };
        let dests = self
            .dump_cmd(IpvsMessage {
                cmd: cmd::GET_DEST,
                attrs: vec![Attr::Nested(CMD_ATTR_SERVICE, service_id(key))],
            })?
            .iter()
            .filter_map(|d| parse_dest(&d.attrs, af(&key.addr)))
            .map(|d| (d.addr, d))
            .collect();
        Ok(Some(ServiceState { server, dests }))
    }

    fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), IpvsError>> {
        let mut out = Vec::with_capacity(ops.len());
        for batch in ops.chunks(BATCH) {
            self.apply_batch(batch, &mut out);
        }
        out
    }

    fn apply(&mut self, op: &Op) -> Result<(), IpvsError> {
        let (m, name, target) = request(op);
        let g = self.ipvs(m);
        let seq = self.send(g, NLM_F_REQUEST | NLM_F_ACK)?;
        self.replies::<IpvsMessage>(seq, |_| {})?
            .map_err(|source| IpvsError::Refused {
                op: name,
                target,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(addr: &str, port: u16) -> ServiceKey {
        ServiceKey {
            addr: addr.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    #[test]
    fn a_service_request_decodes_back_to_the_same_virtual_server() {
        for addr in ["10.96.0.10", "fd00:10:96::10"] {
            let vs = VirtualServer {
                key: key(addr, 80),
                scheduler: "wrr".into(),
                persistent_timeout: Some(10800),
            };
            let (m, name, _) = request(&Op::AddService(vs.clone()));
            assert_eq!(name, "IPVS_CMD_NEW_SERVICE");
            let mut buf = vec![0u8; m.buffer_len()];
            m.emit(&mut buf);
            let back = IpvsMessage::parse_with_param(
                &buf[..],
                GenlHeader {
                    cmd: m.cmd,
                    version: 1,
                },
            )
            .unwrap();
            assert_eq!(parse_service(&back.attrs), Some(vs));
        }
    }

    #[test]
    fn a_batch_is_one_datagram_of_aligned_messages_that_parse_back_in_order() {
        let ops = [
            Op::DelService(key("10.96.0.1", 80)),
            Op::AddService(VirtualServer {
                key: key("fd00:10:96::10", 443),
                scheduler: "rr".into(),
                persistent_timeout: None,
            }),
            Op::DelService(key("10.96.0.2", 8080)),
        ];
        let mut buf = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let mut g = GenlMessage::from_payload(request(op).0);
            g.set_resolved_family_id(42);
            frame(&mut buf, g, NLM_F_REQUEST | NLM_F_ACK, 100 + i as u32);
        }
        let mut offset = 0;
        let mut back = Vec::new();
        while offset < buf.len() {
            assert_eq!(offset % 4, 0);
            let len = netlink_packet_core::NetlinkBuffer::new_checked(&buf[offset..])
                .unwrap()
                .length() as usize;
            let msg =
                NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&buf[offset..offset + len])
                    .unwrap();
            assert_eq!(msg.header.flags, NLM_F_REQUEST | NLM_F_ACK);
            let NetlinkPayload::InnerMessage(g) = msg.payload else {
                panic!("not a request: {msg:?}");
            };
            back.push((msg.header.sequence_number, g.payload.cmd));
            offset += (len + 3) & !3;
        }
        let want: Vec<(u32, u8)> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| (100 + i as u32, request(op).0.cmd))
            .collect();
        assert_eq!(back, want);
    }

    #[test]
    fn set_config_carries_only_the_timeouts_given() {
        let t = Timeouts {
            tcp: 900,
            tcp_fin: 0,
            udp: 30,
        };
        let m = set_config_request(&t);
        assert_eq!(m.cmd, cmd::SET_CONFIG);
        assert_eq!(
            m.attrs,
            vec![
                Attr::u32_ne(CMD_ATTR_TIMEOUT_TCP, 900),
                Attr::u32_ne(CMD_ATTR_TIMEOUT_UDP, 30)
            ]
        );
        assert_eq!(parse_config(&m.attrs), t);
        assert!(set_config_request(&Timeouts::default()).attrs.is_empty());
    }

    #[test]
    fn ipv6_real_servers_carry_sixteen_address_bytes_and_their_family() {
        let d = RealServer::new("[fd00:10:244:1::10]:8080".parse().unwrap(), 1);
        let Attr::Nested(_, attrs) = dest_attrs(&d) else {
            panic!("not nested")
        };
        assert_eq!(bytes(&attrs, DEST_ADDR).map(<[u8]>::len), Some(16));
        assert_eq!(
            get_u16_ne(&attrs, DEST_ADDR_FAMILY),
            Some(libc::AF_INET6 as u16)
        );
        let parsed = parse_dest(&[Attr::Nested(CMD_ATTR_DEST, attrs)], libc::AF_INET6 as u16);
        assert_eq!(parsed, Some(d));
        // A v6 virtual server: AF_INET6 and a /128 netmask.
        let vs = VirtualServer {
            key: key("fd00:10:96::20", 80),
            scheduler: "rr".into(),
            persistent_timeout: None,
        };
        let Attr::Nested(_, s) = service_attrs(&vs) else {
            panic!("not nested")
        };
        assert_eq!(get_u16_ne(&s, SVC_AF), Some(libc::AF_INET6 as u16));
        assert_eq!(get_u32(&s, SVC_NETMASK), Some(128));
    }

    #[test]
    fn ports_travel_in_network_byte_order_and_dests_use_nat() {
        let d = RealServer::new("10.244.1.10:8080".parse().unwrap(), 1);
        let Attr::Nested(_, attrs) = dest_attrs(&d) else {
            panic!("not nested")
        };
        assert_eq!(bytes(&attrs, DEST_PORT), Some(&[0x1f, 0x90][..]));
        assert_eq!(get_u32(&attrs, DEST_FWD_METHOD), Some(FWD_MASQ));
        let parsed = parse_dest(&[Attr::Nested(CMD_ATTR_DEST, attrs)], libc::AF_INET as u16);
        assert_eq!(parsed, Some(d));
    }
}
