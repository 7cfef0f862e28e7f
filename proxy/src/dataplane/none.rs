//! The dataplane of `--run-service-proxy=false`: Services are another proxy's, so nothing
//! is programmed for them; the nftables mode's `weir` tables a previous run left go.

use super::nft::sync::LeftoverTables;
use super::nft::NftBackend;
use super::{Changed, Dataplane, DataplaneError, SyncReport};
use crate::model::DesiredState;

/// Programs no Service; removes the nftables mode's leftover tables.
pub struct NoServices<K: NftBackend> {
    leftovers: LeftoverTables<K>,
}

impl<K: NftBackend> NoServices<K> {
    /// Leaves Services alone; `kernel` is only used to remove weir's old service tables.
    pub fn new(kernel: K) -> Self {
        NoServices {
            leftovers: LeftoverTables::new(kernel),
        }
    }
}

impl<K: NftBackend> Dataplane for NoServices<K> {
    fn programs_services(&self) -> bool {
        false
    }

    fn tracks_kernel(&self) -> bool {
        true
    }

    async fn remove_leftovers(&mut self) -> Vec<DataplaneError> {
        self.leftovers.remove().await
    }

    async fn sync(
        &mut self,
        _desired: &DesiredState,
        _changed: Changed<'_>,
    ) -> Result<SyncReport, DataplaneError> {
        Ok(SyncReport::default())
    }
}
