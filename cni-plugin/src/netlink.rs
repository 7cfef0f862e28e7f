//! Links, addresses and routes over rtnetlink, in the network namespace of the
//! thread that calls [`with_netlink`] (the node's, or a pod's inside
//! [`crate::netns::Netns::run`]).

use futures_util::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

/// rtnetlink failures.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket or the runtime around it could not be set up.
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[from] io::Error),
    /// An object that was just created or looked up is not there.
    #[error("{0} is missing")]
    Missing(String),
    /// A request failed.
    #[error("{op}: {source}")]
    Op {
        /// The request, with its object (`adding route 10.244.1.5/32 dev weir…`).
        op: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

impl NetlinkError {
    /// The kernel's errno (positive), when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Op {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => Some(-m.raw_code()),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

fn op(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = what.into();
    move |source| NetlinkError::Op { op, source }
}

/// An interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Hardware address.
    pub mac: Vec<u8>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// `IFLA_IFALIAS`.
    pub alias: Option<String>,
    /// The link kind (`veth`, …).
    pub kind: Option<String>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: None,
            up: m.header.flags.contains(LinkFlags::Up),
            alias: None,
            kind: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(mac) => link.mac = mac.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The hardware address as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// A route as the kernel reports it (main table, unicast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// Destination prefix.
    pub dst: IpNetwork,
    /// Gateway.
    pub gw: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
}

/// A route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRoute {
    /// Destination prefix.
    pub dst: IpNetwork,
    /// Gateway.
    pub gw: Option<IpAddr>,
    /// Output interface.
    pub oif: u32,
    /// Gateway reachable on the link without a connected prefix.
    pub onlink: bool,
}

/// A connection in the current thread's network namespace.
pub struct Netlink {
    handle: Handle,
}

/// Runs `f` with a connection in the calling thread's network namespace, on a
/// single-threaded runtime (so every request is made from this thread).
pub fn with_netlink<T>(f: impl AsyncFnOnce(&Netlink) -> T) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let out = f(&Netlink { handle }).await;
        task.abort();
        Ok(out)
    })
}

impl Netlink {
    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == libc_enodev() => Ok(None),
            Err(e) => Err(op(format!("looking up link {name}"))(e)),
        }
    }

    /// Every link.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let mut out = Vec::new();
        let mut s = self.handle.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(op("listing links"))? {
            out.push(Link::from_message(&m));
        }
        Ok(out)
    }

    /// Creates the veth pair `host` (here) and `peer` (directly in the namespace `peer_netns`,
    /// so no temporary name ever exists here), both with `mtu`.
    pub async fn create_veth(
        &self,
        host: &str,
        peer: &str,
        peer_netns: RawFd,
        mtu: u32,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .mtu(mtu)
            .setns_by_fd(peer_netns)
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(op(format!("creating veth {host} with peer {peer}")))
    }

    /// Sets the alias of link `index` and brings it up.
    pub async fn set_up(&self, index: u32, alias: Option<&str>) -> Result<()> {
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(a) = alias {
            b = b.alias(a.to_owned());
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(op(format!("setting link {index} up")))
    }

    /// Deletes link `index`; `false` when it was already gone.
    pub async fn delete_link(&self, index: u32) -> Result<bool> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == libc_enodev() => Ok(false),
            Err(e) => Err(op(format!("deleting link {index}"))(e)),
        }
    }

    /// Adds `ip/prefix` to link `index` (IPv6 without duplicate address detection, so the
    /// address is usable at once).
    pub async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            let m = req.message_mut();
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(op(format!("adding address {ip}/{prefix} to link {index}")))
    }

    /// The addresses on link `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(op(format!("listing addresses of link {index}")))?
        {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip {
                if let Ok(n) = IpNetwork::new(ip, m.header.prefix_len) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// Adds a route in the main table.
    pub async fn add_route(&self, r: &NewRoute) -> Result<()> {
        let mut msg: RouteMessage = match (r.dst, r.gw) {
            (IpNetwork::V4(d), gw) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d.network(), d.prefix())
                    .output_interface(r.oif);
                if let Some(IpAddr::V4(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
            (IpNetwork::V6(d), gw) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d.network(), d.prefix())
                    .output_interface(r.oif);
                if let Some(IpAddr::V6(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
        };
        if r.gw.is_none() && r.dst.is_ipv4() {
            msg.header.scope = RouteScope::Link;
        }
        if r.onlink {
            msg.header.flags.insert(RouteFlags::Onlink);
        }
        let what = match r.gw {
            Some(g) => format!("adding route {} via {g} dev {}", r.dst, r.oif),
            None => format!("adding route {} dev {}", r.dst, r.oif),
        };
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(op(what))
    }

    /// The unicast routes of the main table in one family.
    pub async fn routes(&self, v6: bool) -> Result<Vec<RouteEntry>> {
        let query = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let mut out = Vec::new();
        let mut s = self.handle.route().get(query).execute();
        while let Some(m) = s.try_next().await.map_err(op("listing routes"))? {
            let table = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(m.header.table));
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) || m.header.kind != RouteType::Unicast
            {
                continue;
            }
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                        dst = Some(IpAddr::V4(*ip))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                        dst = Some(IpAddr::V6(*ip))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(IpAddr::V4(*ip)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gw = Some(IpAddr::V6(*ip)),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(if v6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            });
            if let Ok(dst) = IpNetwork::new(dst, m.header.destination_prefix_length) {
                out.push(RouteEntry { dst, gw, oif });
            }
        }
        Ok(out)
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

/// Whether a link is a veth (for checks that refuse to touch anything else).
pub fn is_veth(link: &Link) -> bool {
    link.kind.as_deref() == Some(&InfoKind::Veth.to_string())
}
