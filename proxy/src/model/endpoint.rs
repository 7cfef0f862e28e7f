//! EndpointSlice -> [`EndpointInfo`].
/// placeholder
pub struct EndpointInfo;
