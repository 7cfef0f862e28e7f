//! Stale UDP conntrack cleanup over ctnetlink (`NETLINK_NETFILTER`, subsystem
//! `NFNL_SUBSYS_CTNETLINK`), as kube-proxy does.
//!
//! UDP has no connection teardown: once the kernel has a conntrack entry for a client's
//! flow, every later datagram of that flow follows the entry's NAT, not the current rules.
//! When a UDP endpoint goes away, flows still DNATed to it black-hole until the entry
//! times out; when a UDP service gets its first endpoint, flows that were tracked without
//! DNAT (before the service had a backend) stay un-DNATed. Deleting those entries makes
//! the next datagram go through the rules again.
//!
//! [`Conntrack::delete_matching`] dumps the table once per address family and deletes the
//! matching entries by their original tuple (with the entry's id and zone, so an entry
//! recreated meanwhile is left alone). Message encoding is `netlink-packet-netfilter`'s;
//! the socket is `netlink-sys`'s. [`filters_for_change`] is the pure part: which filters
//! an endpoint change calls for.

use crate::dataplane::netlink::{frame, messages, NetlinkError, NetlinkSocket};
use crate::model::Protocol;
use netlink_packet_core::{
    DecodeError, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NLA_TYPE_MASK, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Which flows to delete (all given fields must match; IPv4 and IPv6).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowFilter {
    /// The flow's L4 protocol.
    pub protocol: Protocol,
    /// Destination address of the original direction (the service frontend); `None`
    /// matches any (a NodePort).
    pub orig_dst: Option<IpAddr>,
    /// Destination port of the original direction.
    pub orig_dport: Option<u16>,
    /// Source address of the reply direction: the endpoint the flow was DNATed to.
    pub reply_src: Option<IpAddr>,
    /// Source port of the reply direction: the endpoint's port (a Service whose
    /// targetPort changes keeps its endpoint addresses and moves their ports).
    pub reply_sport: Option<u16>,
}

impl FlowFilter {
    /// Whether `flow` is one of the flows this filter selects.
    fn matches(&self, flow: &Flow) -> bool {
        self.protocol.number() == flow.protocol
            && self.orig_dst.is_none_or(|d| d == flow.orig_dst)
            && self.orig_dport.is_none_or(|p| p == flow.orig_dport)
            && self.reply_src.is_none_or(|s| Some(s) == flow.reply_src)
            && self.reply_sport.is_none_or(|p| Some(p) == flow.reply_sport)
    }

    /// The address family this filter can match, or `None` for both.
    fn family(&self) -> Option<Family> {
        self.orig_dst.or(self.reply_src).map(Family::of)
    }
}

/// The conntrack filters a change of a service port's endpoints calls for.
///
/// `frontends` are `(Some(ip), port)` for a ClusterIP, external or load-balancer IP and
/// `(None, node_port)` for a NodePort. Only UDP needs cleanup (TCP and SCTP flows to a
/// gone endpoint are reset or time out on their own), so other protocols get none. For
/// each endpoint (address and port) in `old_endpoints` but not in `new_endpoints`, and each
/// frontend of its address family: the flows to that frontend DNATed to that endpoint (so
/// a changed targetPort moves flows off the old port, as kube-proxy's reconciler does). When the service
/// gets its first endpoints (`old_endpoints` empty, `new_endpoints` not): every flow to
/// each frontend, since those were tracked before there was a DNAT to follow.
///
/// The result is sorted and free of duplicates.
pub fn filters_for_change(
    old_endpoints: &[std::net::SocketAddr],
    new_endpoints: &[std::net::SocketAddr],
    frontends: &[(Option<IpAddr>, u16)],
    protocol: Protocol,
) -> Vec<FlowFilter> {
    if protocol != Protocol::Udp {
        return Vec::new();
    }
    let mut out = BTreeSet::new();
    for gone in old_endpoints
        .iter()
        .filter(|ip| !new_endpoints.contains(ip))
    {
        for &(ip, port) in frontends {
            // A flow's frontend and its DNAT target share an address family.
            if ip.is_some_and(|ip| ip.is_ipv4() != gone.is_ipv4()) {
                continue;
            }
            out.insert(FlowFilter {
                protocol,
                orig_dst: ip,
                orig_dport: Some(port),
                reply_src: Some(gone.ip()),
                reply_sport: Some(gone.port()),
            });
        }
    }
    if old_endpoints.is_empty() && !new_endpoints.is_empty() {
        for &(ip, port) in frontends {
            out.insert(FlowFilter {
                protocol,
                orig_dst: ip,
                orig_dport: Some(port),
                reply_src: None,
                reply_sport: None,
            });
        }
    }
    out.into_iter().collect()
}

/// Failures talking to ctnetlink.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The netlink socket could not be opened, bound or connected.
    #[error("opening a NETLINK_NETFILTER socket: {0}")]
    Open(#[source] io::Error),
    /// Sending to or receiving from the socket failed.
    #[error("netlink {op}: {source}")]
    Socket {
        /// `send` or `recv`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The kernel refused to dump the table.
    #[error("dumping the {family} conntrack table: {source}")]
    Dump {
        /// `ipv4` or `ipv6`.
        family: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
    /// A reply was not a well-formed netlink message.
    #[error("malformed netlink reply: {0}")]
    Decode(String),
    /// Some deletions failed for another reason than the entry being gone already.
    #[error("deleting {failed} conntrack entries failed ({deleted} deleted): {source}")]
    Delete {
        /// Entries deleted anyway.
        deleted: usize,
        /// Entries whose deletion failed.
        failed: usize,
        /// The first failure.
        source: io::Error,
    },
}

impl From<NetlinkError> for ConntrackError {
    fn from(e: NetlinkError) -> Self {
        match e {
            NetlinkError::Open(e) => ConntrackError::Open(e),
            NetlinkError::Socket { op, source } => ConntrackError::Socket { op, source },
            NetlinkError::Decode(m) => ConntrackError::Decode(m),
        }
    }
}

impl From<DecodeError> for ConntrackError {
    fn from(e: DecodeError) -> Self {
        ConntrackError::Decode(e.to_string())
    }
}

/// An address family of the conntrack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn nfproto(self) -> NetfilterProtoFamily {
        match self {
            Family::V4 => NetfilterProtoFamily::IPv4,
            Family::V6 => NetfilterProtoFamily::IPv6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The same family as nftables names it (the family metrics are labelled with).
    fn table_family(self) -> crate::dataplane::nft::Family {
        match self {
            Family::V4 => crate::dataplane::nft::Family::Ip,
            Family::V6 => crate::dataplane::nft::Family::Ip6,
        }
    }
}

/// One family's pass of a cleanup ([`Conntrack::delete_matching_reporting`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanupPass {
    /// The conntrack table's address family.
    pub family: crate::dataplane::nft::Family,
    /// Entries the pass deleted.
    pub deleted: usize,
    /// How long the pass took: dumping the table, matching and deleting.
    pub took: Duration,
}

/// `CTA_ID`: the entry's id, checked by the kernel on delete.
const CTA_ID: u16 = 12;
/// `CTA_ZONE`: the entry's conntrack zone.
const CTA_ZONE: u16 = 18;
/// Deletions sent in one `send` (their acks easily fit one receive buffer).
const DELETE_BATCH: usize = 128;
/// Receive buffer: larger than any skb the kernel builds for a dump (32 KiB).
const RX_BUFFER: usize = 64 * 1024;

/// One conntrack entry as dumped, with what it takes to delete exactly it.
#[derive(Clone, Debug)]
struct Flow {
    family: Family,
    protocol: u8,
    orig_dst: IpAddr,
    orig_dport: u16,
    reply_src: Option<IpAddr>,
    reply_sport: Option<u16>,
    /// The original tuple as the kernel sent it (addresses, ports, tuple zone).
    orig: Vec<Tuple>,
    /// `CTA_ID` and `CTA_ZONE`, as the kernel sent them.
    identity: Vec<ConntrackAttribute>,
}

impl Flow {
    /// Reads the fields filters look at; `None` for entries without an address or port
    /// tuple (not TCP/UDP/SCTP, so no filter could select them).
    fn from_attributes(family: Family, attributes: Vec<ConntrackAttribute>) -> Option<Flow> {
        let mut orig = None;
        let mut reply_src = None;
        let mut reply_sport = None;
        let mut identity = Vec::new();
        for a in attributes {
            match a {
                ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
                ConntrackAttribute::CtaTupleReply(t) => (reply_src, reply_sport) = tuple_source(&t),
                ConntrackAttribute::Other(ref nla)
                    if matches!(nla.kind() & NLA_TYPE_MASK, CTA_ID | CTA_ZONE) =>
                {
                    identity.push(a)
                }
                _ => {}
            }
        }
        let orig = orig?;
        let mut dst = None;
        let mut protocol = None;
        let mut dport = None;
        for t in &orig {
            match t {
                Tuple::Ip(ips) => {
                    for ip in ips {
                        if let IPTuple::DestinationAddress(a) = ip {
                            dst = Some(*a);
                        }
                    }
                }
                Tuple::Proto(protos) => {
                    for p in protos {
                        match p {
                            ProtoTuple::Protocol(n) => protocol = Some(u8::from(*n)),
                            ProtoTuple::DestinationPort(port) => dport = Some(*port),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Flow {
            family,
            protocol: protocol?,
            orig_dst: dst?,
            orig_dport: dport?,
            reply_src,
            reply_sport,
            orig,
            identity,
        })
    }
}

/// A tuple's source address and source port.
fn tuple_source(tuple: &[Tuple]) -> (Option<IpAddr>, Option<u16>) {
    let (mut addr, mut port) = (None, None);
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    if let IPTuple::SourceAddress(a) = ip {
                        addr = Some(*a);
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    if let ProtoTuple::SourcePort(n) = p {
                        port = Some(*n);
                    }
                }
            }
            _ => {}
        }
    }
    (addr, port)
}

/// A ctnetlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Conntrack {
    nl: NetlinkSocket,
}

impl Conntrack {
    /// Opens a `NETLINK_NETFILTER` socket talking to the kernel. Needs `CAP_NET_ADMIN`
    /// for deletions (dumps work without).
    pub fn open() -> Result<Conntrack, ConntrackError> {
        let mut nl = NetlinkSocket::open(NETLINK_NETFILTER, RX_BUFFER)?;
        nl.cap_ack();
        Ok(Conntrack { nl })
    }

    /// Dumps the conntrack table of the current network namespace once (per address
    /// family present in filters) and deletes each entry matching any filter. Returns the
    /// number deleted. Entries that vanish meanwhile (ENOENT) are not errors.
    ///
    /// A filter with neither `orig_dst` nor `reply_src` applies to both families. Other
    /// deletion failures do not stop the rest: they are counted and the first is returned
    /// in [`ConntrackError::Delete`].
    pub fn delete_matching(&mut self, filters: &[FlowFilter]) -> Result<usize, ConntrackError> {
        self.delete_matching_reporting(filters, |_| {})
    }

    /// [`Self::delete_matching`], calling `on_pass` after each family's pass (dump, match,
    /// delete) with what it deleted and how long it took, also when some deletions of the
    /// pass failed. A pass whose dump or socket failed is not reported.
    pub fn delete_matching_reporting(
        &mut self,
        filters: &[FlowFilter],
        mut on_pass: impl FnMut(CleanupPass),
    ) -> Result<usize, ConntrackError> {
        if filters.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let mut families = BTreeSet::new();
        for f in filters {
            match f.family() {
                Some(fam) => {
                    families.insert(fam);
                }
                None => families.extend([Family::V4, Family::V6]),
            }
        }
        let (mut deleted, mut vanished, mut failed) = (0, 0, 0);
        let mut first_failure = None;
        for family in families {
            let relevant: Vec<&FlowFilter> = filters
                .iter()
                .filter(|f| f.family().is_none_or(|x| x == family))
                .collect();
            let pass_started = Instant::now();
            let (flows, scanned) =
                self.dump(family, |flow| relevant.iter().any(|f| f.matches(flow)))?;
            let outcome = self.delete(&flows)?;
            on_pass(CleanupPass {
                family: family.table_family(),
                deleted: outcome.deleted,
                took: pass_started.elapsed(),
            });
            tracing::debug!(
                family = family.name(),
                scanned,
                matched = flows.len(),
                deleted = outcome.deleted,
                vanished = outcome.vanished,
                failed = outcome.failed,
                "conntrack cleanup pass"
            );
            deleted += outcome.deleted;
            vanished += outcome.vanished;
            failed += outcome.failed;
            if first_failure.is_none() {
                first_failure = outcome.first_failure;
            }
        }
        tracing::info!(
            filters = filters.len(),
            deleted,
            vanished,
            failed,
            elapsed_us = started.elapsed().as_micros() as u64,
            "deleted stale conntrack entries"
        );
        match first_failure {
            Some(source) => Err(ConntrackError::Delete {
                deleted,
                failed,
                source,
            }),
            None => Ok(deleted),
        }
    }

    /// Appends one ctnetlink request to `out`; returns its sequence number.
    fn request(
        &mut self,
        out: &mut Vec<u8>,
        flags: u16,
        family: Family,
        message: ConntrackMessage,
    ) -> u32 {
        let seq = self.nl.next_seq();
        encode(out, seq, flags, family, message);
        seq
    }

    /// Dumps the table of one family, keeping the flows `keep` selects; also returns how
    /// many entries were seen.
    fn dump(
        &mut self,
        family: Family,
        keep: impl Fn(&Flow) -> bool,
    ) -> Result<(Vec<Flow>, usize), ConntrackError> {
        let mut req = Vec::new();
        let seq = self.request(
            &mut req,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            ConntrackMessage::Get(Vec::new()),
        );
        self.nl.send(&req)?;
        let mut kept = Vec::new();
        let (mut scanned, mut undecodable) = (0usize, 0usize);
        loop {
            let rx = self.nl.recv()?;
            for bytes in messages(rx)? {
                let msg = match NetlinkMessage::<NetfilterMessage>::deserialize(bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        undecodable += 1;
                        tracing::debug!(error = %e, "skipping an undecodable conntrack entry");
                        continue;
                    }
                };
                if msg.header.sequence_number != seq {
                    continue; // a late reply to an earlier request
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => {
                        if undecodable > 0 {
                            tracing::warn!(
                                family = family.name(),
                                undecodable,
                                "conntrack entries the decoder did not understand were skipped"
                            );
                        }
                        return Ok((kept, scanned));
                    }
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(ConntrackError::Dump {
                                family: family.name(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            });
                        }
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                        ..
                    }) => {
                        scanned += 1;
                        if let Some(flow) = Flow::from_attributes(family, attrs) {
                            if keep(&flow) {
                                kept.push(flow);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Deletes `flows` by original tuple, id and zone, [`DELETE_BATCH`] per send.
    fn delete(&mut self, flows: &[Flow]) -> Result<DeleteOutcome, ConntrackError> {
        let mut outcome = DeleteOutcome::default();
        for batch in flows.chunks(DELETE_BATCH) {
            let mut req = Vec::new();
            let mut pending: HashMap<u32, &Flow> = HashMap::with_capacity(batch.len());
            for flow in batch {
                let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(flow.orig.clone())];
                attrs.extend(flow.identity.iter().cloned());
                let seq = self.request(
                    &mut req,
                    NLM_F_REQUEST | NLM_F_ACK,
                    flow.family,
                    ConntrackMessage::Delete(attrs),
                );
                pending.insert(seq, flow);
            }
            self.nl.send(&req)?;
            while !pending.is_empty() {
                let rx = self.nl.recv()?;
                for bytes in messages(rx)? {
                    let msg = NetlinkMessage::<NetfilterMessage>::deserialize(bytes)?;
                    let NetlinkPayload::Error(e) = msg.payload else {
                        continue;
                    };
                    let Some(flow) = pending.remove(&msg.header.sequence_number) else {
                        continue;
                    };
                    match e.code.map(|c| -c.get()) {
                        None => {
                            outcome.deleted += 1;
                            tracing::trace!(
                                orig_dst = %flow.orig_dst,
                                orig_dport = flow.orig_dport,
                                reply_src = ?flow.reply_src,
                                "deleted conntrack entry"
                            );
                        }
                        Some(libc::ENOENT) => outcome.vanished += 1,
                        Some(errno) => {
                            outcome.failed += 1;
                            let err = io::Error::from_raw_os_error(errno);
                            tracing::debug!(
                                orig_dst = %flow.orig_dst,
                                orig_dport = flow.orig_dport,
                                error = %err,
                                "deleting a conntrack entry failed"
                            );
                            outcome.first_failure.get_or_insert(err);
                        }
                    }
                }
            }
        }
        Ok(outcome)
    }
}

/// Appends one ctnetlink message to `out`.
fn encode(out: &mut Vec<u8>, seq: u32, flags: u16, family: Family, message: ConntrackMessage) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family.nfproto(), 0, 0),
            message,
        )),
    );
    frame(out, packet);
}

#[derive(Debug, Default)]
struct DeleteOutcome {
    deleted: usize,
    vanished: usize,
    failed: usize,
    first_failure: Option<io::Error>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use netlink_packet_netfilter::conntrack::Protocol as CtProtocol;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn flow(dst: &str, dport: u16, reply_src: &str, proto: u8) -> Flow {
        let orig = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(ip("198.51.100.2")),
                IPTuple::DestinationAddress(ip(dst)),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(CtProtocol::from(proto)),
                ProtoTuple::SourcePort(40000),
                ProtoTuple::DestinationPort(dport),
            ]),
        ];
        let reply = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(ip(reply_src)),
                IPTuple::DestinationAddress(ip("198.51.100.2")),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(CtProtocol::from(proto)),
                ProtoTuple::SourcePort(5353),
                ProtoTuple::DestinationPort(40000),
            ]),
        ];
        Flow::from_attributes(
            Family::of(ip(dst)),
            vec![
                ConntrackAttribute::CtaTupleOrig(orig),
                ConntrackAttribute::CtaTupleReply(reply),
            ],
        )
        .unwrap()
    }

    fn f(dst: Option<&str>, port: u16, reply: Option<&str>) -> FlowFilter {
        FlowFilter {
            protocol: Protocol::Udp,
            orig_dst: dst.map(ip),
            orig_dport: Some(port),
            reply_src: reply.map(ip),
            reply_sport: reply.map(|_| 5353),
        }
    }

    /// An endpoint on port 5353.
    fn ep(s: &str) -> std::net::SocketAddr {
        std::net::SocketAddr::new(ip(s), 5353)
    }

    #[test]
    fn removed_endpoint_gets_a_filter_per_frontend() {
        let got = filters_for_change(
            &[ep("10.244.1.10"), ep("10.244.1.11")],
            &[ep("10.244.1.11"), ep("10.244.1.12")],
            &[(Some(ip("10.96.0.53")), 53), (None, 30053)],
            Protocol::Udp,
        );
        assert_eq!(
            got,
            vec![
                f(None, 30053, Some("10.244.1.10")),
                f(Some("10.96.0.53"), 53, Some("10.244.1.10")),
            ]
        );
    }

    #[test]
    fn first_endpoint_clears_every_flow_to_the_frontends() {
        let got = filters_for_change(
            &[],
            &[ep("10.244.1.10")],
            &[(Some(ip("10.96.0.53")), 53), (None, 30053)],
            Protocol::Udp,
        );
        assert_eq!(
            got,
            vec![f(None, 30053, None), f(Some("10.96.0.53"), 53, None)]
        );
    }

    #[test]
    fn no_filters_for_tcp_sctp_or_no_change() {
        let old = [ep("10.244.1.10")];
        let fe = [(Some(ip("10.96.0.10")), 80)];
        assert!(filters_for_change(&old, &[], &fe, Protocol::Tcp).is_empty());
        assert!(filters_for_change(&old, &[], &fe, Protocol::Sctp).is_empty());
        assert!(filters_for_change(&[], &old, &fe, Protocol::Tcp).is_empty());
        assert!(filters_for_change(&old, &old, &fe, Protocol::Udp).is_empty());
        assert!(filters_for_change(&[], &[], &fe, Protocol::Udp).is_empty());
        assert!(filters_for_change(&old, &[], &[], Protocol::Udp).is_empty());
    }

    #[test]
    fn a_changed_target_port_clears_the_flows_to_the_old_port() {
        let old = [std::net::SocketAddr::new(ip("10.244.1.10"), 8080)];
        let new = [std::net::SocketAddr::new(ip("10.244.1.10"), 9090)];
        let got = filters_for_change(&old, &new, &[(None, 30080)], Protocol::Udp);
        assert_eq!(
            got,
            vec![FlowFilter {
                protocol: Protocol::Udp,
                orig_dst: None,
                orig_dport: Some(30080),
                reply_src: Some(ip("10.244.1.10")),
                reply_sport: Some(8080),
            }]
        );
        let mut to_new = flow("192.168.77.2", 30080, "10.244.1.10", 17);
        to_new.reply_sport = Some(9090);
        assert!(!got[0].matches(&to_new), "flows to the new port stay");
        to_new.reply_sport = Some(8080);
        assert!(got[0].matches(&to_new));
    }

    #[test]
    fn last_endpoint_removed_only_clears_its_flows() {
        let got = filters_for_change(
            &[ep("10.244.1.10")],
            &[],
            &[(Some(ip("10.96.0.53")), 53)],
            Protocol::Udp,
        );
        assert_eq!(got, vec![f(Some("10.96.0.53"), 53, Some("10.244.1.10"))]);
    }

    #[test]
    fn dual_stack_pairs_frontends_and_endpoints_of_one_family() {
        let got = filters_for_change(
            &[
                ep("10.244.1.10"),
                ep("fd00:10:244:1::10"),
                ep("10.244.1.10"),
            ],
            &[],
            &[
                (Some(ip("10.96.0.53")), 53),
                (Some(ip("fd00:10:96::53")), 53),
                (None, 30053),
            ],
            Protocol::Udp,
        );
        assert_eq!(
            got,
            vec![
                f(None, 30053, Some("10.244.1.10")),
                f(None, 30053, Some("fd00:10:244:1::10")),
                f(Some("10.96.0.53"), 53, Some("10.244.1.10")),
                f(Some("fd00:10:96::53"), 53, Some("fd00:10:244:1::10")),
            ]
        );
    }

    #[test]
    fn filter_matching() {
        let stale = flow("10.96.0.53", 53, "10.244.1.10", 17);
        assert!(f(Some("10.96.0.53"), 53, Some("10.244.1.10")).matches(&stale));
        assert!(f(None, 53, Some("10.244.1.10")).matches(&stale));
        assert!(f(Some("10.96.0.53"), 53, None).matches(&stale));
        assert!(!f(Some("10.96.0.54"), 53, Some("10.244.1.10")).matches(&stale));
        assert!(!f(Some("10.96.0.53"), 54, Some("10.244.1.10")).matches(&stale));
        assert!(!f(Some("10.96.0.53"), 53, Some("10.244.1.11")).matches(&stale));
        let tcp = flow("10.96.0.53", 53, "10.244.1.10", 6);
        assert!(!f(Some("10.96.0.53"), 53, None).matches(&tcp));
        let v6 = flow("fd00:10:96::53", 53, "fd00:10:244:1::10", 17);
        assert!(f(Some("fd00:10:96::53"), 53, Some("fd00:10:244:1::10")).matches(&v6));
        assert!(f(None, 53, None).matches(&v6));
    }

    #[test]
    fn filter_families() {
        assert_eq!(f(Some("10.96.0.53"), 53, None).family(), Some(Family::V4));
        assert_eq!(
            f(None, 53, Some("fd00:10:244:1::10")).family(),
            Some(Family::V6)
        );
        assert_eq!(f(None, 30053, None).family(), None);
    }

    #[test]
    fn delete_request_round_trips_the_original_tuple_and_id() {
        let mut stale = flow("10.96.0.53", 53, "10.244.1.10", 17);
        stale.identity = vec![ConntrackAttribute::Other(
            netlink_packet_core::DefaultNla::new(CTA_ID, 7u32.to_be_bytes().to_vec()),
        )];
        let mut buf = Vec::new();
        let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(stale.orig.clone())];
        attrs.extend(stale.identity.iter().cloned());
        encode(
            &mut buf,
            9,
            NLM_F_REQUEST | NLM_F_ACK,
            Family::V4,
            ConntrackMessage::Delete(attrs),
        );
        // nlmsghdr: type = CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE; nfgenmsg family AF_INET.
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), (1 << 8) | 2);
        assert_eq!(buf[16], libc::AF_INET as u8);
        let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)),
            ..
        }) = parsed.payload
        else {
            panic!("not a delete: {parsed:?}");
        };
        let back = Flow::from_attributes(Family::V4, attrs).unwrap();
        assert_eq!(back.orig_dst, ip("10.96.0.53"));
        assert_eq!(back.orig_dport, 53);
        assert_eq!(back.protocol, 17);
        assert_eq!(back.identity.len(), 1);
        assert_eq!(messages(&buf).unwrap().len(), 1);
    }
}
