//! GC: everything of this network that belongs to an attachment missing from
//! `cni.dev/valid-attachments` goes, in DEL's order: records (and temporaries of killed
//! writers), host veth ends (found by the alias weir-cni sets, and by the name of every
//! stale allocation, which also covers a plugin killed between creating a veth and naming
//! it), then allocations and temporaries of killed IPAM writers. GC keeps going after a
//! failure and reports all of them.

use super::{host_ifname, on_host, parse_host_alias};
use crate::attachments::AttachmentStore;
use crate::ipam::store::IpamStore;
use crate::ipam::Owner;
use crate::netlink::is_veth;
use crate::spec::{CniError, ErrorCode, NetConf};
use crate::statedir;
use std::collections::BTreeSet;

pub(super) fn gc(conf: &NetConf) -> Result<(), CniError> {
    // Absent or null (libcni sends null for an empty list): no attachment is valid.
    let valid: BTreeSet<Owner> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| Owner::new(&a.container_id, &a.ifname))
        .collect();
    let dir = conf.network_dir();
    let mut errors: Vec<String> = Vec::new();

    let records = AttachmentStore::new(&dir);
    match records.list() {
        Ok(files) => {
            for (name, record) in files {
                let stale = match &record {
                    Some(r) => !valid.contains(&Owner::new(&r.container_id, &r.ifname)),
                    None => {
                        statedir::is_temporary(&name)
                            || name
                                .strip_suffix(".json")
                                .and_then(|n| n.split_once('@'))
                                .is_some_and(|(id, ifname)| {
                                    !valid.contains(&Owner::new(id, ifname))
                                })
                    }
                };
                if stale {
                    if let Err(e) = records.remove_file(&name) {
                        errors.push(e.to_string());
                    }
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }

    let mut session = IpamStore::new(&dir).lock()?;
    // Under the lock no other writer of ipam.json is running: its temporaries are stale.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if statedir::is_temporary(&e.file_name().to_string_lossy()) {
                if let Err(e) = statedir::remove_durably(&e.path()) {
                    errors.push(e.to_string());
                }
            }
        }
    }
    let stale_owners: BTreeSet<Owner> = session
        .allocations
        .iter()
        .map(|(_, o)| o)
        .filter(|o| !valid.contains(*o))
        .cloned()
        .collect();
    let stale_names: BTreeSet<String> = stale_owners
        .iter()
        .map(|o| host_ifname(&o.container_id, &o.ifname))
        .collect();
    let network = conf.name.as_str();
    let link_errors = on_host(async |nl| {
        let mut errs = Vec::new();
        for l in nl.links().await? {
            if !is_veth(&l) {
                continue;
            }
            let ours_and_stale = match l.alias.as_deref().and_then(parse_host_alias) {
                Some((net, id, ifname)) => {
                    net == network && !valid.contains(&Owner::new(id, ifname))
                }
                None => stale_names.contains(&l.name),
            };
            if ours_and_stale {
                if let Err(e) = nl.delete_link(l.index).await {
                    errs.push(e.to_string());
                }
            }
        }
        Ok(errs)
    });
    let links_left = match link_errors {
        Ok(errs) => {
            let left = !errs.is_empty();
            errors.extend(errs);
            left
        }
        Err(e) => {
            errors.push(e.details);
            true
        }
    };
    // An address whose veth may survive stays reserved, or a new pod could get a route
    // that collides with the old one.
    if !links_left {
        session.allocations.retain(|o| valid.contains(o));
        session.commit()?;
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::IoFailure,
            "GC could not remove every stale resource",
            errors.join("; "),
        ))
    }
}
