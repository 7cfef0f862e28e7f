//! The IPVS mode's [`Dataplane`]: the nftables tables (masquerade marks, rejects, the
//! NodePort and ClusterIP filters) and, in the same sync, IPVS's virtual servers with the
//! dummy interface's addresses.

use super::apply::IpvsSync;
use crate::dataplane::nft::sync::NftDataplane;
use crate::dataplane::nft::NftBackend;
use crate::dataplane::{Changed, Dataplane, DataplaneError, SyncReport};
use crate::model::DesiredState;
use std::time::Duration;
use tracing::warn;

/// How often draining real servers are looked at again.
const DRAIN_RECHECK: Duration = Duration::from_secs(1);

/// nftables and IPVS, synced together.
pub struct IpvsDataplane<K: NftBackend> {
    nft: NftDataplane<K>,
    ipvs: IpvsSync,
    /// Whether removed real servers were still draining after the last IPVS sync.
    draining: bool,
}

impl<K: NftBackend> IpvsDataplane<K> {
    /// Programs `nft` (rendered for IPVS mode) and `ipvs`.
    pub fn new(nft: NftDataplane<K>, ipvs: IpvsSync) -> Self {
        IpvsDataplane {
            nft,
            ipvs,
            draining: false,
        }
    }
}

impl<K: NftBackend> Dataplane for IpvsDataplane<K> {
    fn tracks_kernel(&self) -> bool {
        self.nft.tracks_kernel() && self.ipvs.trusted()
    }

    /// The nftables rules first, then the virtual servers. Operations IPVS refuses are
    /// logged and the rest proceed; the sync then asks for a retry (a full one, soon)
    /// rather than failing, since the nftables part is in place.
    async fn sync(
        &mut self,
        desired: &DesiredState,
        changed: Changed<'_>,
    ) -> Result<SyncReport, DataplaneError> {
        let mut report = self.nft.sync(desired, changed).await?;
        let full = matches!(changed, Changed::Everything);
        match self.ipvs.sync(desired, full, changed).await {
            Ok(r) => {
                self.draining = r.draining;
                report.retry = r.failed > 0;
            }
            Err(e) => {
                warn!(error = %e, "IPVS sync failed; retrying");
                report.retry = true;
            }
        }
        Ok(report)
    }

    fn recheck_after(&self) -> Option<Duration> {
        self.draining.then_some(DRAIN_RECHECK)
    }
}
