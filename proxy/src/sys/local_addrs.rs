//! This node's local addresses, read over rtnetlink (for `--nodeport-addresses` CIDRs).

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Reading the addresses failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalAddrsError {
    /// The rtnetlink socket could not be opened.
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[from] std::io::Error),
    /// The address dump failed.
    #[error("listing addresses over rtnetlink: {0}")]
    Dump(#[from] rtnetlink::Error),
}

/// Every address on every interface of this network namespace, sorted, without
/// duplicates (link-local IPv6 addresses included; callers filter by CIDR).
pub async fn local_addrs() -> Result<Vec<IpAddr>, LocalAddrsError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let mut out = BTreeSet::new();
    let mut dump = handle.address().get().execute();
    let result = loop {
        match dump.try_next().await {
            Ok(Some(msg)) => {
                let local = msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = local.or(addr) {
                    out.insert(ip);
                }
            }
            Ok(None) => break Ok(out.into_iter().collect()),
            Err(e) => break Err(e.into()),
        }
    };
    task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_is_among_the_local_addresses() {
        let addrs = local_addrs().await.unwrap();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }
}
