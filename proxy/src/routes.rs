//! Host-gw pod routing (`--route-pod-cidrs`): a route to every other node's pod CIDRs via
//! that node's InternalIP, from the Node objects, installed over rtnetlink. Weir's routes
//! carry their own protocol number ([`RT_PROTO_WEIR`]), so they are told apart from every
//! other route and stale ones are removed without touching anything else.

use crate::model::store::NodeRecord;
use futures_util::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The route protocol number weir's routes carry (`ip route show proto 77`).
pub const RT_PROTO_WEIR: u8 = 77;

/// One pod route: a node's pod CIDR via that node's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRoute {
    /// The other node's pod CIDR.
    pub dst: IpNetwork,
    /// The other node's address of the same family.
    pub via: IpAddr,
}

/// The routes this node needs: every other node's pod CIDRs, each via that node's first
/// address of the CIDR's family. Nodes without such an address are skipped.
pub fn desired_routes<'a>(
    nodes: impl IntoIterator<Item = (&'a str, &'a NodeRecord)>,
    me: &str,
) -> BTreeSet<PodRoute> {
    let mut out = BTreeSet::new();
    for (name, node) in nodes {
        if name == me {
            continue;
        }
        for cidr in &node.pod_cidrs {
            let via = node
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == cidr.is_ipv4())
                .copied();
            if let Some(via) = via {
                out.insert(PodRoute { dst: *cidr, via });
            }
        }
    }
    out
}

/// Talking to the kernel's routing table failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The rtnetlink socket could not be opened.
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[from] std::io::Error),
    /// A route operation failed.
    #[error("{op} route {route}: {source}")]
    Op {
        /// What was attempted.
        op: &'static str,
        /// The route.
        route: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// Listing routes failed.
    #[error("listing routes: {0}")]
    List(rtnetlink::Error),
    /// A route could not be expressed.
    #[error("route {route}: {message}")]
    Invalid {
        /// The route.
        route: String,
        /// Why.
        message: String,
    },
}

/// Installs and removes weir's pod routes.
pub struct RouteController {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RouteController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn describe(r: &PodRoute) -> String {
    format!("{} via {}", r.dst, r.via)
}

impl RouteController {
    /// Opens an rtnetlink connection (inside a tokio runtime).
    pub fn new() -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        Ok(RouteController { handle, task })
    }

    /// Weir's routes now in the main table.
    pub async fn installed(&self) -> Result<BTreeSet<PodRoute>, RouteError> {
        let mut out = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let mut routes = self.handle.route().get(query).execute();
            while let Some(m) = routes.try_next().await.map_err(RouteError::List)? {
                if m.header.protocol != RouteProtocol::Other(RT_PROTO_WEIR)
                    || m.header.table != RouteHeader::RT_TABLE_MAIN
                {
                    continue;
                }
                if let Some(r) = parse(&m) {
                    out.insert(r);
                }
            }
        }
        Ok(out)
    }

    /// Makes weir's routes exactly `want`; returns (added, removed).
    pub async fn sync(&self, want: &BTreeSet<PodRoute>) -> Result<(usize, usize), RouteError> {
        let have = self.installed().await?;
        let mut removed = 0;
        for r in have.difference(want) {
            let msg = message(r)?;
            self.handle
                .route()
                .del(msg)
                .execute()
                .await
                .map_err(|source| RouteError::Op {
                    op: "deleting",
                    route: describe(r),
                    source,
                })?;
            removed += 1;
        }
        let mut added = 0;
        for r in want.difference(&have) {
            let msg = message(r)?;
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|source| RouteError::Op {
                    op: "adding",
                    route: describe(r),
                    source,
                })?;
            added += 1;
        }
        Ok((added, removed))
    }
}

fn message(r: &PodRoute) -> Result<RouteMessage, RouteError> {
    let invalid = |message: String| RouteError::Invalid {
        route: describe(r),
        message,
    };
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix())
        .map_err(|e| invalid(e.to_string()))?
        .gateway(r.via)
        .map_err(|e| invalid(e.to_string()))?
        .protocol(RouteProtocol::Other(RT_PROTO_WEIR))
        .build())
}

fn parse(m: &RouteMessage) -> Option<PodRoute> {
    let addr = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut dst = None;
    let mut via = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr(d),
            RouteAttribute::Gateway(g) => via = addr(g),
            _ => {}
        }
    }
    let dst = IpNetwork::new(dst?, m.header.destination_prefix_length).ok()?;
    Some(PodRoute { dst, via: via? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ips: &[&str], cidrs: &[&str]) -> NodeRecord {
        NodeRecord {
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            zone: None,
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn routes_go_to_every_other_node_by_family() {
        let a = node(
            &["192.168.77.1", "fd00:77::1"],
            &["10.244.1.0/24", "fd00:10:244:1::/64"],
        );
        let b = node(
            &["192.168.77.2", "fd00:77::2"],
            &["10.244.2.0/24", "fd00:10:244:2::/64"],
        );
        let c = node(&["192.168.77.3"], &["10.244.3.0/24", "fd00:10:244:3::/64"]);
        let got = desired_routes([("a", &a), ("b", &b), ("c", &c)], "a");
        let text: Vec<String> = got.iter().map(describe).collect();
        assert_eq!(
            text,
            [
                "10.244.2.0/24 via 192.168.77.2",
                "10.244.3.0/24 via 192.168.77.3",
                "fd00:10:244:2::/64 via fd00:77::2",
            ],
            "c has no IPv6 address: its IPv6 CIDR is skipped; a is this node"
        );
    }

    #[test]
    fn a_route_message_round_trips() {
        let r = PodRoute {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: "192.168.77.2".parse().unwrap(),
        };
        let m = message(&r).unwrap();
        assert_eq!(m.header.protocol, RouteProtocol::Other(RT_PROTO_WEIR));
        assert_eq!(parse(&m), Some(r));
    }
}
