//! compute
/// placeholder
pub struct DesiredState;
/// placeholder
pub struct Endpoint;
/// placeholder
pub struct ModelConfig;
/// placeholder
pub struct ServicePortState;
/// placeholder
pub struct Snapshot;
/// placeholder
pub fn compute() {}
