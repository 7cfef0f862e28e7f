//! STATUS: ready when the network's state can be locked and read and every pod CIDR has a
//! free address.

use crate::ipam::store::IpamStore;
use crate::ipam::{usable_count, IpamError};
use crate::spec::{CniError, ErrorCode, NetConf};

pub(super) fn status(conf: &NetConf) -> Result<(), CniError> {
    let session = IpamStore::new(&conf.network_dir()).lock().map_err(|e| {
        let code = match e {
            // Existing pods cannot be released or checked against a state that cannot be read.
            IpamError::Corrupt { .. } => ErrorCode::LimitedConnectivity,
            _ => ErrorCode::NotAvailable,
        };
        CniError::new(code, "IPAM state is not usable", e.to_string())
    })?;
    for net in conf.pod_cidrs.iter() {
        let used = session.allocations.used_in(net) as u128;
        if used >= usable_count(net) {
            return Err(CniError::new(
                ErrorCode::NotAvailable,
                "address pool exhausted",
                format!("all {used} addresses of {net} are allocated"),
            ));
        }
    }
    Ok(())
}
