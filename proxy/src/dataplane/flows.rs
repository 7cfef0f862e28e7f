//! Which conntrack flows a changed Service port leaves stale: flows to endpoints that went
//! away, and flows tracked before the port had any endpoint (UDP only; TCP flows end by
//! themselves). Pure: [`crate::dataplane::conntrack`] deletes what these filters select.

use crate::dataplane::conntrack::{filters_for_change, FlowFilter};
use crate::model::{Protocol, ServiceDelta, ServicePortState};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Every address a port's traffic can be DNATed to.
fn endpoint_addrs(sp: &ServicePortState) -> Vec<std::net::SocketAddr> {
    let set: BTreeSet<std::net::SocketAddr> = sp
        .endpoints
        .iter()
        .chain(&sp.local_endpoints)
        .map(|e| std::net::SocketAddr::new(e.ip, e.port))
        .collect();
    set.into_iter().collect()
}

/// Frontends of a port as conntrack sees them: `(Some(ip), port)` for ClusterIPs,
/// external and load-balancer IPs, `(None, nodePort)` for the NodePort.
fn frontends(sp: &ServicePortState) -> Vec<(Option<IpAddr>, u16)> {
    let i = &sp.info;
    let mut f: Vec<(Option<IpAddr>, u16)> = i
        .cluster_ips
        .iter()
        .chain(&i.external_ips)
        .chain(&i.load_balancer_ips)
        .map(|ip| (Some(*ip), i.port))
        .collect();
    if let Some(np) = i.node_port {
        f.push((None, np));
    }
    f
}

/// The stale-flow filters one changed Service port calls for (UDP only): flows to
/// endpoints that went away, and flows tracked before the port had any endpoint.
pub fn flow_filters(d: &ServiceDelta) -> Vec<FlowFilter> {
    let sp = d.new.as_ref().or(d.old.as_ref());
    let Some(sp) = sp.filter(|sp| sp.info.name.protocol == Protocol::Udp) else {
        return Vec::new();
    };
    let old = d.old.as_ref().map(endpoint_addrs).unwrap_or_default();
    let new = d.new.as_ref().map(endpoint_addrs).unwrap_or_default();
    // Frontends of both versions: a removed port's flows go too.
    let mut fronts: Vec<(Option<IpAddr>, u16)> = d
        .old
        .iter()
        .chain(d.new.iter())
        .flat_map(frontends)
        .collect();
    fronts.sort();
    fronts.dedup();
    filters_for_change(&old, &new, &fronts, sp.info.name.protocol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dns_port as port;

    fn delta(old: Option<ServicePortState>, new: Option<ServicePortState>) -> ServiceDelta {
        ServiceDelta {
            name: old.as_ref().or(new.as_ref()).unwrap().info.name.clone(),
            old,
            new,
        }
    }

    #[test]
    fn a_removed_udp_endpoint_clears_its_flows_on_every_frontend() {
        let d = delta(
            Some(port(Protocol::Udp, &["10.244.1.5", "10.244.2.5"], false)),
            Some(port(Protocol::Udp, &["10.244.1.5"], false)),
        );
        let f = flow_filters(&d);
        let got: Vec<String> = f
            .iter()
            .map(|f| format!("{:?} {:?} {:?}", f.orig_dst, f.orig_dport, f.reply_src))
            .collect();
        assert_eq!(
            got,
            [
                "None Some(30053) Some(10.244.2.5)",
                "Some(10.96.0.53) Some(53) Some(10.244.2.5)"
            ]
        );
    }

    #[test]
    fn first_endpoints_clear_flows_to_the_frontends_and_tcp_needs_nothing() {
        let d = delta(
            Some(port(Protocol::Udp, &[], false)),
            Some(port(Protocol::Udp, &["10.244.1.5"], false)),
        );
        assert_eq!(flow_filters(&d).len(), 2);
        assert!(flow_filters(&d).iter().all(|f| f.reply_src.is_none()));
        let tcp = delta(
            Some(port(Protocol::Tcp, &["10.244.1.5"], false)),
            Some(port(Protocol::Tcp, &[], false)),
        );
        assert!(flow_filters(&tcp).is_empty());
    }
}
