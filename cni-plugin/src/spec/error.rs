//! The CNI error result: `{"cniVersion", "code", "msg", "details"}` on stdout, exit status 1.

use super::CniVersion;
use serde::Serialize;

/// Error codes: the spec's well-known ones (0-99) and weir-cni's own (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: incompatible CNI version.
    IncompatibleVersion,
    /// 2: unsupported field in the network configuration (the message names key and value).
    UnsupportedField,
    /// 3: container unknown or does not exist (its network namespace is gone); the runtime
    /// need not clean up.
    UnknownContainer,
    /// 4: invalid necessary environment variables (the message names them).
    InvalidEnvironment,
    /// 5: I/O failure.
    IoFailure,
    /// 6: failed to decode content.
    DecodingFailure,
    /// 7: invalid network configuration.
    InvalidConfig,
    /// 11: try again later (weir-cni: the address pool is exhausted).
    TryAgainLater,
    /// 50: the plugin cannot service ADD requests (STATUS).
    NotAvailable,
    /// 51: the plugin cannot service ADD requests and existing containers may have limited
    /// connectivity (STATUS).
    LimitedConnectivity,
    /// 100: a kernel operation (rtnetlink, setns) failed.
    Kernel,
    /// 101: the interface `CNI_IFNAME` already exists in the container.
    InterfaceExists,
    /// 102: CHECK found the attachment not as ADD left it.
    CheckFailed,
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::IoFailure => 5,
            ErrorCode::DecodingFailure => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::LimitedConnectivity => 51,
            ErrorCode::Kernel => 100,
            ErrorCode::InterfaceExists => 101,
            ErrorCode::CheckFailed => 102,
        }
    }
}

/// An error as the plugin reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {}: {msg}: {details}", code.code())]
pub struct CniError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// A short message characterizing the error.
    pub msg: String,
    /// A longer message describing the error.
    pub details: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    details: &'a str,
}

impl CniError {
    /// An error with a code, a short message and details.
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error's JSON, reported in `version`.
    pub fn to_json(&self, version: CniVersion) -> String {
        let wire = Wire {
            cni_version: version.as_str(),
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        };
        // Serializing a struct of strings and an integer cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_keys() {
        let e = CniError::new(
            ErrorCode::InvalidConfig,
            "Invalid Configuration",
            "Network 192.168.0.0/31 too small to allocate from.",
        );
        let v: serde_json::Value = serde_json::from_str(&e.to_json(CniVersion::V1_1_0)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "code": 7,
                "msg": "Invalid Configuration",
                "details": "Network 192.168.0.0/31 too small to allocate from."
            })
        );
    }

    #[test]
    fn well_known_codes_match_the_spec_table() {
        let codes: Vec<u32> = [
            ErrorCode::IncompatibleVersion,
            ErrorCode::UnsupportedField,
            ErrorCode::UnknownContainer,
            ErrorCode::InvalidEnvironment,
            ErrorCode::IoFailure,
            ErrorCode::DecodingFailure,
            ErrorCode::InvalidConfig,
            ErrorCode::TryAgainLater,
            ErrorCode::NotAvailable,
            ErrorCode::LimitedConnectivity,
        ]
        .into_iter()
        .map(ErrorCode::code)
        .collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6, 7, 11, 50, 51]);
        assert!(ErrorCode::Kernel.code() >= 100);
    }
}
