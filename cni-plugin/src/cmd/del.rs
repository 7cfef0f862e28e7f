//! DEL: the record, then the veth pair (deleting the host end removes the pod end and every
//! route through either), then the allocation. Each step tolerates its object being gone,
//! so DEL succeeds for unknown containers, a vanished netns and repeated calls.

use super::{host_alias, host_ifname, is_host_end_of, on_host, required};
use crate::attachments::AttachmentStore;
use crate::ipam::store::IpamStore;
use crate::ipam::Owner;
use crate::spec::{CniEnv, CniError, NetConf};

pub(super) fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let id = required(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = required(&env.ifname, "CNI_IFNAME")?;
    let dir = conf.network_dir();
    AttachmentStore::new(&dir).remove(id, ifname)?;
    let host = host_ifname(id, ifname);
    let alias = host_alias(&conf.name, id, ifname);
    on_host(async |nl| {
        if let Some(l) = nl.link(&host).await? {
            if is_host_end_of(&l, &alias) {
                nl.delete_link(l.index).await?;
            }
        }
        Ok(())
    })?;
    let mut s = IpamStore::new(&dir).lock()?;
    s.allocations.release(&Owner::new(id, ifname));
    s.commit()?;
    Ok(())
}
