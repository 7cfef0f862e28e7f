//! CNI specification versions this plugin speaks, and what each one changes in the protocol.

use std::fmt;

/// A CNI specification version weir-cni supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0: rich results (`interfaces`, `ips` with `version`, `routes`), chaining.
    V0_3_0,
    /// 0.3.1: a typo fix over 0.3.0.
    V0_3_1,
    /// 0.4.0: CHECK, and `prevResult` on DEL.
    V0_4_0,
    /// 1.0.0: configuration lists only; `ips[].version` removed.
    V1_0_0,
    /// 1.1.0: GC and STATUS; `interfaces[].mtu`, `socketPath`, `pciID`; route `mtu`,
    /// `advmss`, `priority`, `table`, `scope`.
    V1_1_0,
}

/// Every version in [`CniVersion`], oldest first (the VERSION verb's `supportedVersions`).
pub const SUPPORTED_VERSIONS: [CniVersion; 5] = [
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

impl CniVersion {
    /// The newest version, used when the input names none we can use.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// Parses an exact supported version string (`"1.0.0"`); anything else is `None`.
    pub fn parse(s: &str) -> Option<CniVersion> {
        SUPPORTED_VERSIONS.into_iter().find(|v| v.as_str() == s)
    }

    /// The version as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results carry `ips[].version` ("4" or "6"): before 1.0.0.
    pub fn has_ip_version_field(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// Whether the CHECK verb exists: from 0.4.0.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// Whether the GC and STATUS verbs exist: from 1.1.0.
    pub fn has_gc_and_status(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Whether results may carry the 1.1.0 fields (`interfaces[].mtu`, `socketPath`,
    /// `pciID`, and route `mtu`, `advmss`, `priority`, `table`, `scope`).
    pub fn has_extended_result_fields(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The supported versions as a comma-separated list, for error details.
pub fn supported_list() -> String {
    SUPPORTED_VERSIONS
        .iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_round_trips_through_its_string() {
        for v in SUPPORTED_VERSIONS {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
    }

    #[test]
    fn versions_outside_the_supported_set_are_rejected() {
        for s in [
            "0.1.0", "0.2.0", "1.2.0", "2.0.0", "1.0", "", "v1.0.0", "banana",
        ] {
            assert_eq!(CniVersion::parse(s), None, "{s}");
        }
    }

    #[test]
    fn verbs_and_fields_follow_the_spec_history() {
        assert!(CniVersion::V0_4_0.has_ip_version_field());
        assert!(!CniVersion::V1_0_0.has_ip_version_field());
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_gc_and_status());
        assert!(CniVersion::V1_1_0.has_gc_and_status());
        assert!(!CniVersion::V1_0_0.has_extended_result_fields());
    }
}
