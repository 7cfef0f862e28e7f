//! Attachment records: one JSON file per attached interface under
//! `STATE_DIR/NETWORK/attachments/CONTAINERID@IFNAME.json`, written atomically once the
//! pod's networking is complete and removed first thing on DEL, for weir-proxy to read
//! (pod IP ↔ host interface ↔ netns ↔ pod). The format is described in the crate README.

use crate::statedir::{self, StateDirError};
use std::path::{Path, PathBuf};

pub use weir_cni_formats::{AttachmentRecord, RECORD_VERSION};

/// Attachment record failures.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    /// Reading, writing or listing failed.
    #[error(transparent)]
    Store(#[from] StateDirError),
    /// A record file is not JSON weir-cni writes.
    #[error("{path}: not an attachment record: {msg}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        msg: String,
    },
}

/// The records of one network.
#[derive(Debug, Clone)]
pub struct AttachmentStore {
    dir: PathBuf,
}

/// The record file name of `(container_id, ifname)` (container IDs never contain `@`).
pub fn file_name(container_id: &str, ifname: &str) -> String {
    weir_cni_formats::record_file_name(container_id, ifname)
}

impl AttachmentStore {
    /// The records in `network_dir/attachments`.
    pub fn new(network_dir: &Path) -> AttachmentStore {
        AttachmentStore {
            dir: network_dir.join("attachments"),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(file_name(container_id, ifname))
    }

    /// Writes (or replaces) a record atomically.
    pub fn write(&self, r: &AttachmentRecord) -> Result<(), AttachmentError> {
        statedir::ensure_dir(&self.dir)?;
        let mut bytes = serde_json::to_vec_pretty(r).unwrap_or_default();
        bytes.push(b'\n');
        statedir::write_atomically(&self.path(&r.container_id, &r.ifname), &bytes)?;
        Ok(())
    }

    /// Reads the record of `(container_id, ifname)`.
    pub fn read(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<AttachmentRecord>, AttachmentError> {
        let path = self.path(container_id, ifname);
        match statedir::read_if_exists(&path)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| AttachmentError::Corrupt {
                    path,
                    msg: e.to_string(),
                }),
        }
    }

    /// Removes the record of `(container_id, ifname)`; `false` if there was none.
    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<bool, AttachmentError> {
        Ok(statedir::remove_durably(&self.path(container_id, ifname))?)
    }

    /// Every file in the directory: `(file name, record)` for records, `(file name, None)`
    /// for anything else (temporaries of killed writers, unreadable files).
    pub fn list(&self) -> Result<Vec<(String, Option<AttachmentRecord>)>, AttachmentError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateDirError::Io {
                    op: "listing",
                    path: self.dir.clone(),
                    source,
                }
                .into())
            }
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let record = if statedir::is_temporary(&name) || !name.ends_with(".json") {
                None
            } else {
                std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
            };
            out.push((name, record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes the file `name` from the directory.
    pub fn remove_file(&self, name: &str) -> Result<bool, AttachmentError> {
        Ok(statedir::remove_durably(&self.dir.join(name))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> AttachmentRecord {
        AttachmentRecord {
            version: RECORD_VERSION,
            network: "weir".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/p".into(),
            pod_namespace: Some("demo".into()),
            pod_name: Some("web-0".into()),
            ips: vec!["10.244.1.5".parse().unwrap()],
            host_interface: "weir0123456789a".into(),
            host_ifindex: 7,
            container_mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
        }
    }

    #[test]
    fn records_are_written_read_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = AttachmentStore::new(dir.path());
        assert!(s.list().unwrap().is_empty());
        s.write(&record("c1")).unwrap();
        s.write(&record("c2")).unwrap();
        assert_eq!(s.read("c1", "eth0").unwrap(), Some(record("c1")));
        let names: Vec<String> = s.list().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["c1@eth0.json", "c2@eth0.json"]);
        assert!(s.remove("c1", "eth0").unwrap());
        assert!(!s.remove("c1", "eth0").unwrap());
        assert_eq!(s.read("c1", "eth0").unwrap(), None);
    }

    #[test]
    fn the_record_json_uses_the_documented_keys() {
        let v = serde_json::to_value(record("c1")).unwrap();
        for key in [
            "version",
            "network",
            "containerID",
            "ifname",
            "netns",
            "podNamespace",
            "podName",
            "ips",
            "hostInterface",
            "hostIfindex",
            "containerMac",
            "mtu",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v.as_object().unwrap().len(), 12);
    }
}
