//! The allocations of one network on disk: `NETWORK_DIR/ipam.json`, read and rewritten
//! only while `NETWORK_DIR/lock` is held, and replaced atomically (so a plugin killed at
//! any instant leaves the previous or the next state, never half of one).
//!
//! ```json
//! {"version": 1,
//!  "allocations": [{"ip": "10.244.1.2", "containerID": "c1", "ifname": "eth0"}],
//!  "lastReserved": {"10.244.1.0/24": "10.244.1.2"}}
//! ```

use super::{Allocations, IpamError, Owner};
use crate::statedir::{self, Lock};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Db {
    version: u32,
    allocations: Vec<Entry>,
    #[serde(default)]
    last_reserved: BTreeMap<IpNetwork, IpAddr>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    ip: IpAddr,
    #[serde(flatten)]
    owner: Owner,
}

/// The IPAM database of one network directory.
#[derive(Debug, Clone)]
pub struct IpamStore {
    dir: PathBuf,
}

/// The allocations, locked against every other plugin process until dropped; changes are
/// kept only by [`Session::commit`].
#[derive(Debug)]
pub struct Session {
    _lock: Lock,
    path: PathBuf,
    loaded: Allocations,
    /// The allocations to change.
    pub allocations: Allocations,
}

impl IpamStore {
    /// The database in `network_dir` (created on first use).
    pub fn new(network_dir: &Path) -> IpamStore {
        IpamStore {
            dir: network_dir.to_owned(),
        }
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("ipam.json")
    }

    /// Takes the network's lock and reads the allocations.
    pub fn lock(&self) -> Result<Session, IpamError> {
        let lock = statedir::lock(&self.dir)?;
        let path = self.path();
        let allocations = match statedir::read_if_exists(&path)? {
            None => Allocations::default(),
            Some(bytes) => decode(&path, &bytes)?,
        };
        Ok(Session {
            _lock: lock,
            path,
            loaded: allocations.clone(),
            allocations,
        })
    }
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Allocations, IpamError> {
    let corrupt = |msg: String| IpamError::Corrupt {
        path: path.to_owned(),
        msg,
    };
    let db: Db = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if db.version != FORMAT_VERSION {
        return Err(corrupt(format!("format version {}", db.version)));
    }
    let mut a = Allocations::default();
    for e in db.allocations {
        if a.owners.insert(e.ip, e.owner).is_some() {
            return Err(corrupt(format!("{} is listed twice", e.ip)));
        }
    }
    a.last = db.last_reserved;
    Ok(a)
}

fn encode(a: &Allocations) -> Vec<u8> {
    let db = Db {
        version: FORMAT_VERSION,
        allocations: a
            .owners
            .iter()
            .map(|(ip, owner)| Entry {
                ip: *ip,
                owner: owner.clone(),
            })
            .collect(),
        last_reserved: a.last.clone(),
    };
    let mut out = serde_json::to_vec_pretty(&db).unwrap_or_default();
    out.push(b'\n');
    out
}

impl Session {
    /// Writes the allocations back if they changed, then releases the lock.
    pub fn commit(self) -> Result<(), IpamError> {
        if self.allocations != self.loaded {
            statedir::write_atomically(&self.path, &encode(&self.allocations))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PodCidrs;
    use std::collections::BTreeSet;

    fn pools() -> PodCidrs {
        PodCidrs {
            v4: Some("10.244.1.0/24".parse().unwrap()),
            v6: Some("fd00:10:244:1::/64".parse().unwrap()),
        }
    }

    #[test]
    fn allocations_survive_a_reopen_and_uncommitted_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path());
        let mut s = store.lock().unwrap();
        let ips = s
            .allocations
            .allocate(&Owner::new("c1", "eth0"), &pools())
            .unwrap();
        s.commit().unwrap();
        let mut s = store.lock().unwrap();
        assert_eq!(s.allocations.owned_by(&Owner::new("c1", "eth0")), ips);
        s.allocations
            .allocate(&Owner::new("c2", "eth0"), &pools())
            .unwrap();
        drop(s);
        let s = store.lock().unwrap();
        assert_eq!(s.allocations.len(), 2);
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"containerID\": \"c1\""), "{text}");
        assert!(text.contains("\"lastReserved\""), "{text}");
    }

    #[test]
    fn a_corrupt_database_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path());
        std::fs::write(store.path(), b"{\"version\": 1, \"allocations\": [").unwrap();
        assert!(matches!(store.lock(), Err(IpamError::Corrupt { .. })));
        std::fs::write(
            store.path(),
            br#"{"version":1,"allocations":[{"ip":"10.0.0.1","containerID":"a","ifname":"eth0"},{"ip":"10.0.0.1","containerID":"b","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert!(
            matches!(store.lock(), Err(IpamError::Corrupt { msg, .. }) if msg.contains("twice"))
        );
    }

    #[test]
    fn parallel_allocators_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let store = IpamStore::new(&path);
                    let mut mine = Vec::new();
                    for i in 0..20 {
                        let mut s = store.lock().unwrap();
                        let owner = Owner::new(&format!("t{t}-{i}"), "eth0");
                        mine.extend(s.allocations.allocate(&owner, &pools()).unwrap());
                        if i % 3 == 0 {
                            s.allocations.release(&owner);
                            mine.truncate(mine.len() - 2);
                        }
                        s.commit().unwrap();
                    }
                    mine
                })
            })
            .collect();
        let mut all = BTreeSet::new();
        let mut count = 0;
        for t in threads {
            for ip in t.join().unwrap() {
                count += 1;
                assert!(all.insert(ip), "{ip} handed out twice");
            }
        }
        let s = IpamStore::new(&path).lock().unwrap();
        assert_eq!(s.allocations.len(), count);
    }
}
