//! ADD: addresses from IPAM, a veth pair with its pod end created directly in the pod,
//! the gateway addresses on the host end, the pod's addresses and default routes, host
//! routes to the pod addresses, and the attachment record. Any failure after the allocation rolls everything back.
//!
//! Order, chosen so a plugin killed at any instant leaves nothing DEL or GC cannot find:
//! the allocation is committed before the veth exists (GC and DEL find the veth by the
//! attachment's name), and the record is written last.

use super::{gateway_for, host_alias, host_ifname, in_pod, is_host_end_of, on_host, required};
use crate::attachments::{AttachmentRecord, AttachmentStore, RECORD_VERSION};
use crate::ipam::store::IpamStore;
use crate::ipam::Owner;
use crate::netlink::{Link, NetlinkError, NewRoute};
use crate::netns::Netns;
use crate::spec::result::{Interface, IpConfig, Route};
use crate::spec::{CniEnv, CniError, CniResult, ErrorCode, NetConf};
use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host prefix of one address: /32 or /128.
pub(super) fn host_prefix(ip: IpAddr) -> IpNetwork {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    // A full-length prefix is always valid.
    IpNetwork::new(ip, len).unwrap_or(IpNetwork::V4(Ipv4Addr::UNSPECIFIED.into()))
}

/// The default route's destination in the family of `ip`.
pub(super) fn default_dst(ip: IpAddr) -> IpNetwork {
    let any = if ip.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    IpNetwork::new(any, 0).unwrap_or(IpNetwork::V4(Ipv4Addr::UNSPECIFIED.into()))
}

/// The gateway addresses the host end carries: one per family among `ips`.
pub(super) fn gateways(ips: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = ips.iter().map(|ip| gateway_for(*ip)).collect();
    out.dedup();
    out
}

/// The prefix length of a gateway address on the host end: 169.254.1.1/32, fe80::1/64.
pub(super) fn gateway_prefix(gw: IpAddr) -> u8 {
    if gw.is_ipv4() {
        32
    } else {
        64
    }
}

pub(super) fn add(env: &CniEnv, conf: &NetConf) -> Result<CniResult, CniError> {
    let id = required(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = required(&env.ifname, "CNI_IFNAME")?;
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::from(crate::spec::env::EnvError::Missing(vec!["CNI_NETNS"])))?;
    let netns = Netns::open(netns_path)?;
    let host = host_ifname(id, ifname);

    if in_pod(&netns, async |nl| nl.link(ifname).await)?.is_some() {
        return Err(CniError::new(
            ErrorCode::InterfaceExists,
            format!("interface {ifname} already exists in the container"),
            format!(
                "{} already has {ifname}; nothing was changed",
                netns.path().display()
            ),
        ));
    }
    // A host end of this very attachment can only be left by a killed ADD: remove it.
    let alias = host_alias(&conf.name, id, ifname);
    on_host(async |nl| {
        if let Some(l) = nl.link(&host).await? {
            if is_host_end_of(&l, &alias) {
                nl.delete_link(l.index).await?;
            }
        }
        Ok(())
    })?;

    let owner = Owner::new(id, ifname);
    let store = IpamStore::new(&conf.network_dir());
    let mut session = store.lock()?;
    let ips = session.allocations.allocate(&owner, &conf.pod_cidrs)?;
    session.commit()?;

    match attach(env, conf, &netns, &host, &ips) {
        Ok(r) => Ok(match &conf.prev_result {
            Some(prev) => prev.clone().merged_with(r),
            None => r,
        }),
        Err(e) => {
            roll_back(conf, &owner, &host, &alias);
            Err(e)
        }
    }
}

fn attach(
    env: &CniEnv,
    conf: &NetConf,
    netns: &Netns,
    host: &str,
    ips: &[IpAddr],
) -> Result<CniResult, CniError> {
    let id = required(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = required(&env.ifname, "CNI_IFNAME")?;
    let alias = host_alias(&conf.name, id, ifname);
    let mtu = conf.mtu;
    let host_link: Link = on_host(async |nl| {
        nl.create_veth(host, ifname, netns.raw_fd(), mtu).await?;
        let link = nl
            .link(host)
            .await?
            .ok_or_else(|| NetlinkError::Missing(format!("new link {host}")))?;
        nl.set_up(link.index, Some(&alias)).await?;
        // The host end owns the pods' gateway addresses, so the pod resolves them with
        // plain ARP and NDP, even after its own hardware address changes (which flushes
        // its neighbour table).
        for gw in gateways(ips) {
            nl.add_address(link.index, gw, gateway_prefix(gw)).await?;
        }
        for ip in ips {
            nl.add_route(&NewRoute {
                dst: host_prefix(*ip),
                gw: None,
                oif: link.index,
                onlink: false,
            })
            .await?;
        }
        Ok(link)
    })?;
    let (pod_link, defaults): (Link, Vec<IpAddr>) = in_pod(netns, async |nl| {
        let link = nl
            .link(ifname)
            .await?
            .ok_or_else(|| NetlinkError::Missing(format!("new link {ifname} in the pod")))?;
        for ip in ips {
            nl.add_address(link.index, *ip, host_prefix(*ip).prefix())
                .await?;
        }
        nl.set_up(link.index, None).await?;
        let mut defaults = Vec::new();
        for ip in ips {
            let route = NewRoute {
                dst: default_dst(*ip),
                gw: Some(gateway_for(*ip)),
                oif: link.index,
                onlink: ip.is_ipv4(),
            };
            match nl.add_route(&route).await {
                Ok(()) => defaults.push(*ip),
                // Another network's interface has the default route: leave it.
                Err(e) if e.errno() == Some(nix::errno::Errno::EEXIST as i32) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((link, defaults))
    })?;

    let netns_str = netns.path().display().to_string();
    AttachmentStore::new(&conf.network_dir()).write(&AttachmentRecord {
        version: RECORD_VERSION,
        network: conf.name.clone(),
        container_id: id.to_owned(),
        ifname: ifname.to_owned(),
        netns: netns_str.clone(),
        pod_namespace: env.args.pod_namespace().map(str::to_owned),
        pod_name: env.args.pod_name().map(str::to_owned),
        ips: ips.to_vec(),
        host_interface: host.to_owned(),
        host_ifindex: host_link.index,
        container_mac: pod_link.mac_string(),
        mtu,
    })?;

    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: host.to_owned(),
                mac: Some(host_link.mac_string()),
                mtu: Some(mtu),
                sandbox: None,
                socket_path: None,
                pci_id: None,
            },
            Interface {
                name: ifname.to_owned(),
                mac: Some(pod_link.mac_string()),
                mtu: Some(mtu),
                sandbox: Some(netns_str),
                socket_path: None,
                pci_id: None,
            },
        ],
        ips: ips
            .iter()
            .map(|ip| IpConfig {
                address: host_prefix(*ip),
                gateway: Some(gateway_for(*ip)),
                interface: Some(1),
            })
            .collect(),
        routes: defaults
            .iter()
            .map(|ip| Route {
                dst: default_dst(*ip),
                gw: Some(gateway_for(*ip)),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            })
            .collect(),
        dns: conf.dns.clone(),
    })
}

/// Undoes a failed ADD: the record, the veth pair (both ends), the allocation. Failures
/// here are reported on stderr; the ADD's own error is what the runtime gets.
fn roll_back(conf: &NetConf, owner: &Owner, host: &str, alias: &str) {
    let dir = conf.network_dir();
    if let Err(e) = AttachmentStore::new(&dir).remove(&owner.container_id, &owner.ifname) {
        eprintln!("weir-cni: rollback: {e}");
    }
    let deleted = on_host(async |nl| {
        // Only ours: a name clash with another link is what may have failed.
        if let Some(l) = nl.link(host).await?.filter(|l| is_host_end_of(l, alias)) {
            nl.delete_link(l.index).await?;
        }
        Ok(())
    });
    if let Err(e) = deleted {
        eprintln!("weir-cni: rollback: deleting {host}: {}", e.details);
    }
    let released = IpamStore::new(&dir).lock().and_then(|mut s| {
        s.allocations.release(owner);
        s.commit()
    });
    if let Err(e) = released {
        eprintln!("weir-cni: rollback: releasing addresses: {e}");
    }
}
