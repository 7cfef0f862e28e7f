//! Reads weir-cni's attachment records (`STATE_DIR/NETWORK/attachments/*.json`, written
//! by the plugin once a pod's interface is complete, removed first thing on DEL): the
//! addresses of the pods attached on this node.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The state directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentsError {
    /// Listing a directory failed.
    #[error("reading weir-cni state {path}: {source}")]
    Read {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Addresses of every attachment under `state_dir`. A missing state directory means no
/// pod is attached yet; a record being replaced or unreadable is skipped with a warning
/// (the next read sees it).
pub fn attached_ips(state_dir: &Path) -> Result<BTreeSet<IpAddr>, AttachmentsError> {
    let mut ips = BTreeSet::new();
    let networks = match std::fs::read_dir(state_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ips),
        Err(source) => {
            return Err(AttachmentsError::Read {
                path: state_dir.to_owned(),
                source,
            })
        }
    };
    for net in networks.flatten() {
        let dir = net.path().join(weir_cni_formats::ATTACHMENTS_DIR);
        let Ok(records) = std::fs::read_dir(&dir) else {
            continue;
        };
        for rec in records.flatten() {
            let path = rec.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<weir_cni_formats::AttachedIps>(&b)
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok(r) => ips.extend(r.ips),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping unreadable attachment record")
                }
            }
        }
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_every_network_are_read_and_other_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert!(attached_ips(&dir.path().join("missing"))
            .unwrap()
            .is_empty());
        let a = dir.path().join("net1/attachments");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(
            a.join("c1@eth0.json"),
            r#"{"version":1,"network":"net1","ips":["10.244.0.5","fd00::5"],"extra":true}"#,
        )
        .unwrap();
        std::fs::write(a.join("c2@eth0.json.tmp"), "partial").unwrap();
        std::fs::write(a.join("c3@eth0.json"), "not json").unwrap();
        std::fs::write(dir.path().join("pod-cidrs.json"), "{}").unwrap();
        let b = dir.path().join("net2/attachments");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("c4@eth1.json"), r#"{"ips":["10.245.0.9"]}"#).unwrap();
        let got: Vec<String> = attached_ips(dir.path())
            .unwrap()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, ["10.244.0.5", "10.245.0.9", "fd00::5"]);
    }
}
