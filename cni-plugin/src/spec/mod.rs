//! The CNI specification (1.1.0, with 0.3.0 to 1.0.0 results): versions, protocol
//! parameters, the plugin configuration, results and errors. Pure serde types, no I/O.

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use config::{NetConf, PodCidrs, ValidAttachment};
pub use env::{CniArgs, CniEnv, Command};
pub use error::{CniError, ErrorCode};
pub use result::CniResult;
pub use version::{CniVersion, SUPPORTED_VERSIONS};
