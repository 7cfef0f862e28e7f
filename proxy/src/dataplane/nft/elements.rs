//! Adding elements to weir's plain sets and maps straight through nfnetlink
//! (`NFT_MSG_NEWSETELEM`), for the large loads of filling a new table: the kernel gets the
//! elements without nft parsing a script of them (at 10,000 Services that parse was most of
//! the first sync's time). The messages are netlink-packet-netfilter's; this module lays
//! weir's keys and data out the way nft declares them (a lone field at its own length,
//! each field of a concatenation on a 4-byte boundary) and cuts them into messages and
//! batches the kernel accepts. Interval and dynamic sets are not for this path.

use super::table::{Atom, Data, Family, Key};
use crate::dataplane::netlink::{self, frame, messages, NetlinkError, NetlinkSocket};
use netlink_packet_core::{
    Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::protocols::NETLINK_NETFILTER;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Element bytes per message: the element list is one attribute, whose length is 16 bits.
const MESSAGE_BYTES: usize = 60_000;
/// Bytes per batch (one transaction, one `send`): under the socket's default send buffer.
const BATCH_BYTES: usize = 160_000;
/// nfnetlink's subsystem number of nftables, the batch messages' resource id.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Receive buffer for the acknowledgements.
const RX_BUFFER: usize = 64 * 1024;

/// Failures adding elements through nfnetlink.
#[derive(Debug, thiserror::Error)]
pub enum ElementsError {
    /// An element this path cannot write (an interval, in a set not declared plain).
    #[error("element {key} of {map}: {reason}")]
    Unsupported {
        /// Set or map name.
        map: String,
        /// The element's key as nft prints it.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// The network namespace to write in could not be entered.
    #[error("entering network namespace {path}: {source}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The socket failed.
    #[error(transparent)]
    Socket(#[from] NetlinkError),
    /// The kernel refused a message; its whole batch was not applied.
    #[error("the kernel refused elements of {map}: {source}")]
    Refused {
        /// Set or map of the refused message (`batch` when it named the batch itself).
        map: String,
        /// The kernel's error.
        source: io::Error,
    },
}

/// The bytes of a key as the kernel holds it.
pub fn key_bytes(map: &str, key: &Key) -> Result<Vec<u8>, ElementsError> {
    let concat = key.0.len() > 1;
    let mut out = Vec::with_capacity(key.0.len() * 4);
    for atom in &key.0 {
        match atom {
            Atom::Addr(std::net::IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
            Atom::Addr(std::net::IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
            Atom::Proto(p) => out.push(p.number()),
            Atom::Port(p) => out.extend_from_slice(&p.to_be_bytes()),
            Atom::Net(_) | Atom::PortRange(..) => {
                return Err(ElementsError::Unsupported {
                    map: map.to_owned(),
                    key: key.to_string(),
                    reason: "intervals are written by nft",
                })
            }
        }
        if concat {
            pad4(&mut out);
        }
    }
    Ok(out)
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// The data attribute of an element (`None` for a set element).
pub fn data_attribute(data: &Data) -> Option<DataAttribute> {
    match data {
        Data::None => None,
        Data::Goto(chain) => Some(DataAttribute::Verdict(vec![
            VerdictAttribute::Code(Verdict::Goto),
            VerdictAttribute::Chain(chain.clone()),
        ])),
        Data::AddrPort(addr, port) => {
            let mut v = match addr {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            };
            v.extend_from_slice(&port.to_be_bytes());
            pad4(&mut v);
            Some(DataAttribute::Value(v))
        }
    }
}

fn element(
    map: &str,
    key: &Key,
    data: &Data,
) -> Result<ListAttribute<SetElementAttribute>, ElementsError> {
    let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(key_bytes(
        map, key,
    )?))];
    if let Some(d) = data_attribute(data) {
        attrs.push(SetElementAttribute::Data(d));
    }
    Ok(ListAttribute::Element(attrs))
}

fn nfproto(family: Family) -> NetfilterProtoFamily {
    match family {
        Family::Ip => NetfilterProtoFamily::IPv4,
        Family::Ip6 => NetfilterProtoFamily::IPv6,
    }
}

/// The datagrams (one batch each) adding `elements` of each map to `table`, with the
/// sequence numbers of the acknowledged messages and the map each one names.
#[derive(Debug, Default)]
pub struct Batches {
    /// One datagram per transaction, in order.
    pub datagrams: Vec<Vec<u8>>,
    /// Per datagram: the sequence number of each element message and its map.
    pub acked: Vec<HashMap<u32, String>>,
}

/// Lays out the batches adding `maps`' elements to `family`'s `table`; sequence numbers
/// come from `next_seq`.
pub fn batches<'a>(
    family: Family,
    table: &str,
    maps: impl IntoIterator<Item = (&'a str, &'a [(Key, Data)])>,
    next_seq: impl FnMut() -> u32,
) -> Result<Batches, ElementsError> {
    let mut writer = BatchWriter {
        family,
        table,
        next_seq,
        open: None,
        out: Batches::default(),
    };
    for (map, elements) in maps {
        let mut list = Vec::new();
        let mut bytes = 0;
        for (key, data) in elements {
            let e = element(map, key, data)?;
            let len = e.buffer_len();
            if bytes + len > MESSAGE_BYTES && !list.is_empty() {
                writer.message(map, std::mem::take(&mut list));
                bytes = 0;
            }
            bytes += len;
            list.push(e);
        }
        if !list.is_empty() {
            writer.message(map, list);
        }
    }
    Ok(writer.finish())
}

/// Appends element messages to the open batch, opening one when needed and closing it
/// before it outgrows [`BATCH_BYTES`].
struct BatchWriter<'t, F> {
    family: Family,
    table: &'t str,
    next_seq: F,
    /// The batch being written: its bytes and its acknowledged messages.
    open: Option<(Vec<u8>, HashMap<u32, String>)>,
    out: Batches,
}

impl<F: FnMut() -> u32> BatchWriter<'_, F> {
    /// Appends one message adding `list` to `map`.
    fn message(&mut self, map: &str, list: Vec<ListAttribute<SetElementAttribute>>) {
        let msg = NfTablesMessage::NewSetElement(SetElementMessage {
            attributes: vec![
                SetElementList::Table(self.table.to_owned()),
                SetElementList::Set(map.to_owned()),
                SetElementList::Elements(list),
            ],
        });
        let next_seq = &mut self.next_seq;
        let (buf, acked) = self.open.get_or_insert_with(|| {
            let mut b = Vec::new();
            frame_nf(
                &mut b,
                next_seq(),
                NLM_F_REQUEST,
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                ControlMessage::BatchBegin,
            );
            (b, HashMap::new())
        });
        let seq = next_seq();
        frame_nf(
            buf,
            seq,
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
            NetfilterHeader::new(nfproto(self.family), 0, 0),
            msg,
        );
        acked.insert(seq, map.to_owned());
        if buf.len() >= BATCH_BYTES - MESSAGE_BYTES - 1024 {
            self.close();
        }
    }

    /// Ends the open batch, if any.
    fn close(&mut self) {
        if let Some((mut buf, acked)) = self.open.take() {
            frame_nf(
                &mut buf,
                (self.next_seq)(),
                NLM_F_REQUEST,
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                ControlMessage::BatchEnd,
            );
            self.out.datagrams.push(buf);
            self.out.acked.push(acked);
        }
    }

    fn finish(mut self) -> Batches {
        self.close();
        self.out
    }
}

/// Appends one nfnetlink message (`header` + `inner`) with `seq` and `flags` to `buf`.
fn frame_nf(
    buf: &mut Vec<u8>,
    seq: u32,
    flags: u16,
    header: NetfilterHeader,
    inner: impl Into<netlink_packet_netfilter::NetfilterMessageInner>,
) {
    let mut nl = NetlinkHeader::default();
    nl.flags = flags;
    nl.sequence_number = seq;
    frame(
        buf,
        NetlinkMessage::new(
            nl,
            NetlinkPayload::from(NetfilterMessage::new(header, inner)),
        ),
    );
}

/// Adds `maps`' elements to `family`'s `table` in the network namespace at `netns` (this
/// thread's when `None`); returns the number of transactions. Elements already present
/// with the same data are not an error, as with `nft add element`.
pub fn add<'a>(
    netns: Option<&Path>,
    family: Family,
    table: &str,
    maps: impl IntoIterator<Item = (&'a str, &'a [(Key, Data)])> + Send,
) -> Result<usize, ElementsError> {
    match netns {
        None => add_here(family, table, maps),
        Some(path) => {
            netlink::in_netns(path, || add_here(family, table, maps)).unwrap_or_else(|source| {
                Err(ElementsError::Netns {
                    path: path.to_owned(),
                    source,
                })
            })
        }
    }
}

fn add_here<'a>(
    family: Family,
    table: &str,
    maps: impl IntoIterator<Item = (&'a str, &'a [(Key, Data)])>,
) -> Result<usize, ElementsError> {
    let mut nl = NetlinkSocket::open(NETLINK_NETFILTER, RX_BUFFER)?;
    nl.cap_ack();
    let b = batches(family, table, maps, || nl.next_seq())?;
    for (datagram, mut pending) in b.datagrams.iter().zip(b.acked) {
        nl.send(datagram)?;
        while !pending.is_empty() {
            let rx = nl.recv()?;
            for bytes in messages(rx)? {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(bytes)
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let NetlinkPayload::Error(e) = msg.payload else {
                    continue;
                };
                let seq = msg.header.sequence_number;
                let map = pending.remove(&seq);
                if let Some(code) = e.code {
                    return Err(ElementsError::Refused {
                        map: map.unwrap_or_else(|| "batch".to_owned()),
                        source: io::Error::from_raw_os_error(-code.get()),
                    });
                }
            }
        }
    }
    Ok(b.datagrams.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::objects::Protocol;

    fn key(atoms: Vec<Atom>) -> Key {
        Key(atoms)
    }

    #[test]
    fn a_lone_field_keeps_its_length_and_a_concatenation_pads_each_field() {
        let port = key(vec![Atom::Port(30080)]);
        assert_eq!(key_bytes("m", &port).unwrap(), vec![0x75, 0x80]);
        let k = key(vec![
            Atom::Addr("10.96.0.10".parse().unwrap()),
            Atom::Proto(Protocol::Udp),
            Atom::Port(53),
        ]);
        assert_eq!(
            key_bytes("m", &k).unwrap(),
            vec![10, 96, 0, 10, 17, 0, 0, 0, 0, 53, 0, 0]
        );
        let v6 = key(vec![
            Atom::Addr("fd00::1".parse().unwrap()),
            Atom::Proto(Protocol::Tcp),
        ]);
        let b = key_bytes("m", &v6).unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!((b[0], b[15], b[16], b[17]), (0xfd, 1, 6, 0));
    }

    #[test]
    fn intervals_are_refused_naming_the_map_and_element() {
        let k = key(vec![Atom::prefix("10.0.0.0/8".parse().unwrap())]);
        let e = key_bytes("firewall_allow", &k).unwrap_err().to_string();
        assert!(
            e.contains("firewall_allow") && e.contains("10.0.0.0/8"),
            "{e}"
        );
    }

    #[test]
    fn data_is_a_goto_verdict_or_a_padded_address_and_port() {
        assert_eq!(data_attribute(&Data::None), None);
        assert_eq!(
            data_attribute(&Data::AddrPort("10.244.1.10".parse().unwrap(), 8080)),
            Some(DataAttribute::Value(vec![10, 244, 1, 10, 0x1f, 0x90, 0, 0]))
        );
        assert_eq!(
            data_attribute(&Data::Goto("pick_3".into())),
            Some(DataAttribute::Verdict(vec![
                VerdictAttribute::Code(Verdict::Goto),
                VerdictAttribute::Chain("pick_3".into()),
            ]))
        );
    }

    /// Parses the batches back: every element once, each message under the attribute
    /// limit, each datagram one begin ... end under the send limit.
    #[test]
    fn many_elements_split_into_messages_and_batches_the_kernel_accepts() {
        let elements: Vec<(Key, Data)> = (0..20_000u32)
            .map(|i| {
                let a = std::net::Ipv4Addr::from(0x0a60_0000 + i);
                (
                    key(vec![
                        Atom::Addr(a.into()),
                        Atom::Proto(Protocol::Tcp),
                        Atom::Port(80),
                    ]),
                    Data::Goto(format!("pick_{}", i % 7)),
                )
            })
            .collect();
        let few = vec![(key(vec![Atom::Port(1)]), Data::None)];
        let mut seq = 0;
        let b = batches(
            Family::Ip,
            "weir",
            [
                ("service_ips", elements.as_slice()),
                ("ports", few.as_slice()),
            ],
            || {
                seq += 1;
                seq
            },
        )
        .unwrap();
        assert!(b.datagrams.len() > 1, "{} datagrams", b.datagrams.len());
        let mut counted: HashMap<String, usize> = HashMap::new();
        for (d, acked) in b.datagrams.iter().zip(&b.acked) {
            assert!(d.len() <= BATCH_BYTES, "{} bytes", d.len());
            let msgs = messages(d).unwrap();
            let kinds: Vec<NetfilterMessage> = msgs
                .iter()
                .map(|m| {
                    match NetlinkMessage::<NetfilterMessage>::deserialize(m)
                        .unwrap()
                        .payload
                    {
                        NetlinkPayload::InnerMessage(n) => n,
                        p => panic!("{p:?}"),
                    }
                })
                .collect();
            assert!(matches!(
                kinds.first().map(|k| &k.inner),
                Some(netlink_packet_netfilter::NetfilterMessageInner::None(
                    ControlMessage::BatchBegin
                ))
            ));
            assert!(matches!(
                kinds.last().map(|k| &k.inner),
                Some(netlink_packet_netfilter::NetfilterMessageInner::None(
                    ControlMessage::BatchEnd
                ))
            ));
            assert_eq!(acked.len(), msgs.len() - 2);
            for k in &kinds[1..kinds.len() - 1] {
                let netlink_packet_netfilter::NetfilterMessageInner::NfTables(
                    NfTablesMessage::NewSetElement(m),
                ) = &k.inner
                else {
                    panic!("{k:?}");
                };
                let mut set = String::new();
                for a in &m.attributes {
                    match a {
                        SetElementList::Set(s) => set = s.clone(),
                        SetElementList::Elements(l) => {
                            assert!(l.as_slice().buffer_len() <= MESSAGE_BYTES);
                            *counted.entry(set.clone()).or_default() += l.len();
                        }
                        _ => {}
                    }
                }
            }
        }
        assert_eq!(counted["service_ips"], 20_000);
        assert_eq!(counted["ports"], 1);
    }
}
