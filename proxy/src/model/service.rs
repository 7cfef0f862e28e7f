//! Service -> per-port [`ServiceInfo`].
/// placeholder
pub struct ServiceInfo;
/// placeholder
pub enum TargetPort {}
