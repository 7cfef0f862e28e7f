//! VERSION: the supported versions, reported in the version the input names.

use crate::spec::{CniVersion, SUPPORTED_VERSIONS};
use serde_json::{json, Value};

pub(super) fn version(stdin: &[u8]) -> String {
    let requested = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| CniVersion::LATEST.as_str().to_owned());
    let supported: Vec<&str> = SUPPORTED_VERSIONS.iter().map(|v| v.as_str()).collect();
    json!({"cniVersion": requested, "supportedVersions": supported}).to_string()
}
