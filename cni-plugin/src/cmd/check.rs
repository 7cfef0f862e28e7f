//! CHECK: what `prevResult` says weir-cni created must still be there. The pod interface
//! (up, MTU, hardware address if listed, its addresses), the default routes via the
//! link-local gateway that the result lists, the host end (up, MTU, a route to each pod
//! address through it), the IPAM reservation and the attachment record. Routes added by
//! later plugins are ignored.

use super::add::{gateway_prefix, gateways, host_prefix};
use super::{gateway_for, host_ifname, in_pod, on_host, required};
use crate::attachments::AttachmentStore;
use crate::ipam::store::IpamStore;
use crate::ipam::Owner;
use crate::netlink::{is_veth, Link, RouteEntry};
use crate::netns::Netns;
use crate::spec::{CniEnv, CniError, ErrorCode, NetConf};
use std::collections::BTreeSet;
use std::net::IpAddr;

fn failed(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::CheckFailed, msg, details)
}

pub(super) fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let id = required(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = required(&env.ifname, "CNI_IFNAME")?;
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::from(crate::spec::env::EnvError::Missing(vec!["CNI_NETNS"])))?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "missing required field \"prevResult\"",
            "CHECK needs the result of the ADD in prevResult",
        )
    })?;
    let netns = Netns::open(netns_path)?;
    let sandbox = netns.path().display().to_string();

    let (index, pod_if) = prev
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == ifname && i.sandbox.as_deref() == Some(sandbox.as_str()))
        .ok_or_else(|| {
            failed(
                format!("prevResult has no interface {ifname} in {sandbox}"),
                "the result passed to CHECK is not the one ADD returned",
            )
        })?;
    let expected: BTreeSet<IpAddr> = prev
        .ips
        .iter()
        .filter(|c| c.interface == Some(index))
        .map(|c| c.address.ip())
        .collect();
    let our_routes: Vec<_> = prev
        .routes
        .iter()
        .filter(|r| r.gw.is_some_and(|g| g == gateway_for(r.dst.ip())))
        .collect();

    let reserved: BTreeSet<IpAddr> = IpamStore::new(&conf.network_dir())
        .lock()?
        .allocations
        .owned_by(&Owner::new(id, ifname))
        .into_iter()
        .collect();
    if reserved != expected {
        return Err(failed(
            "IPAM reservation differs from prevResult",
            format!("reserved {reserved:?}, prevResult lists {expected:?}"),
        ));
    }
    if AttachmentStore::new(&conf.network_dir())
        .read(id, ifname)?
        .is_none()
    {
        return Err(failed(
            "attachment record missing",
            format!("no record for {id}/{ifname}"),
        ));
    }

    let host = host_ifname(id, ifname);
    let (host_link, host_addrs, host_routes) = on_host(async |nl| {
        let Some(link) = nl.link(&host).await?.filter(is_veth) else {
            return Ok((None, Vec::new(), Vec::new()));
        };
        let addrs = nl.addresses(link.index).await?;
        let mut routes = nl.routes(false).await?;
        routes.extend(nl.routes(true).await?);
        Ok((Some(link), addrs, routes))
    })?;
    let host_link = host_link.ok_or_else(|| {
        failed(
            format!("host interface {host} is missing"),
            "the veth pair is gone",
        )
    })?;
    check_link(&host_link, conf.mtu, None)?;
    let wanted: Vec<IpAddr> = expected.iter().copied().collect();
    for gw in gateways(&wanted) {
        if !host_addrs
            .iter()
            .any(|a| a.ip() == gw && a.prefix() == gateway_prefix(gw))
        {
            return Err(failed(
                format!("gateway address {gw} is missing on {host}"),
                format!("{host} has {host_addrs:?}"),
            ));
        }
    }
    for ip in &expected {
        let dst = host_prefix(*ip);
        if !host_routes
            .iter()
            .any(|r| r.dst == dst && r.oif == Some(host_link.index) && r.gw.is_none())
        {
            return Err(failed(
                format!("host route to {dst} is missing"),
                format!("expected {dst} dev {host}"),
            ));
        }
    }

    let (pod_link, addrs, pod_routes) = in_pod(&netns, async |nl| {
        let Some(link) = nl.link(ifname).await? else {
            return Ok((None, Vec::new(), Vec::new()));
        };
        let addrs = nl.addresses(link.index).await?;
        let mut routes: Vec<RouteEntry> = nl.routes(false).await?;
        routes.extend(nl.routes(true).await?);
        Ok((Some(link), addrs, routes))
    })?;
    let pod_link = pod_link.ok_or_else(|| {
        failed(
            format!("interface {ifname} is missing in the container"),
            sandbox.clone(),
        )
    })?;
    check_link(&pod_link, conf.mtu, pod_if.mac.as_deref())?;
    for ip in &expected {
        let want = host_prefix(*ip);
        if !addrs.contains(&want) {
            return Err(failed(
                format!("address {want} is missing on {ifname}"),
                format!("{ifname} has {addrs:?}"),
            ));
        }
    }
    for r in our_routes {
        let found = pod_routes
            .iter()
            .any(|e| e.dst == r.dst && e.gw == r.gw && e.oif == Some(pod_link.index));
        if !found {
            return Err(failed(
                format!("route {} via {:?} is missing in the container", r.dst, r.gw),
                format!("{ifname} routes: {pod_routes:?}"),
            ));
        }
    }
    Ok(())
}

fn check_link(link: &Link, mtu: u32, mac: Option<&str>) -> Result<(), CniError> {
    if !link.up {
        return Err(failed(format!("{} is down", link.name), "expected it up"));
    }
    if link.mtu != Some(mtu) {
        return Err(failed(
            format!("{} has MTU {:?}", link.name, link.mtu),
            format!("the configuration says {mtu}"),
        ));
    }
    if let Some(mac) = mac {
        if !link.mac_string().eq_ignore_ascii_case(mac) {
            return Err(failed(
                format!("{} has hardware address {}", link.name, link.mac_string()),
                format!("prevResult says {mac}"),
            ));
        }
    }
    Ok(())
}
