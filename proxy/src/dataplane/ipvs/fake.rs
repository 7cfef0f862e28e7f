//! An in-memory IPVS that rejects what the kernel rejects: a duplicate virtual or real
//! server (`EEXIST`), an unknown scheduler (`ENOENT`), anything about a missing virtual
//! server (`ESRCH`), changing or deleting a missing real server (`ENOENT`).

use super::{IpvsBackend, IpvsError, IpvsState, Op, ServiceKey, ServiceState};
use std::io;
use std::net::SocketAddr;

/// Schedulers the kernel of the VM suite has.
pub const KNOWN_SCHEDULERS: &[&str] = &["rr", "wrr", "lc", "wlc", "sh", "dh", "mh"];

/// The fake IPVS table.
#[derive(Clone, Debug, Default)]
pub struct FakeIpvs {
    state: IpvsState,
    /// Operations applied so far.
    pub applied: usize,
    /// Dumps answered so far (what an idle sync should not need).
    pub dumps: usize,
    /// Single virtual servers read so far.
    pub reads: usize,
}

fn refused(op: &'static str, target: String, errno: i32) -> IpvsError {
    IpvsError::Refused {
        op,
        target,
        source: io::Error::from_raw_os_error(errno),
    }
}

impl FakeIpvs {
    /// Sets a real server's connection counts, as traffic would.
    pub fn set_conns(&mut self, key: ServiceKey, dest: SocketAddr, active: u32, inactive: u32) {
        if let Some(d) = self
            .state
            .get_mut(&key)
            .and_then(|s| s.dests.get_mut(&dest))
        {
            d.active_conns = active;
            d.inactive_conns = inactive;
        }
    }

    fn service(
        &mut self,
        op: &'static str,
        key: &ServiceKey,
    ) -> Result<&mut ServiceState, IpvsError> {
        self.state
            .get_mut(key)
            .ok_or_else(|| refused(op, key.to_string(), libc::ESRCH))
    }
}

impl IpvsBackend for FakeIpvs {
    fn dump(&mut self) -> Result<IpvsState, IpvsError> {
        self.dumps += 1;
        Ok(self.state.clone())
    }

    fn read_service(&mut self, key: &ServiceKey) -> Result<Option<ServiceState>, IpvsError> {
        self.reads += 1;
        Ok(self.state.get(key).cloned())
    }

    fn apply(&mut self, op: &Op) -> Result<(), IpvsError> {
        match op {
            Op::AddService(s) | Op::UpdateService(s)
                if !KNOWN_SCHEDULERS.contains(&s.scheduler.as_str()) =>
            {
                return Err(refused(
                    "IPVS_CMD_NEW_SERVICE",
                    s.scheduler.clone(),
                    libc::ENOENT,
                ))
            }
            Op::AddService(s) => {
                if self.state.contains_key(&s.key) {
                    return Err(refused(
                        "IPVS_CMD_NEW_SERVICE",
                        s.key.to_string(),
                        libc::EEXIST,
                    ));
                }
                self.state.insert(
                    s.key,
                    ServiceState {
                        server: s.clone(),
                        dests: Default::default(),
                    },
                );
            }
            Op::UpdateService(s) => {
                self.service("IPVS_CMD_SET_SERVICE", &s.key)?.server = s.clone();
            }
            Op::DelService(k) => {
                if self.state.remove(k).is_none() {
                    return Err(refused("IPVS_CMD_DEL_SERVICE", k.to_string(), libc::ESRCH));
                }
            }
            Op::AddDest(k, d) => {
                let s = self.service("IPVS_CMD_NEW_DEST", k)?;
                if s.dests.contains_key(&d.addr) {
                    return Err(refused(
                        "IPVS_CMD_NEW_DEST",
                        d.addr.to_string(),
                        libc::EEXIST,
                    ));
                }
                s.dests.insert(d.addr, *d);
            }
            Op::UpdateDest(k, d) => {
                let s = self.service("IPVS_CMD_SET_DEST", k)?;
                let Some(have) = s.dests.get_mut(&d.addr) else {
                    return Err(refused(
                        "IPVS_CMD_SET_DEST",
                        d.addr.to_string(),
                        libc::ENOENT,
                    ));
                };
                have.weight = d.weight;
            }
            Op::DelDest(k, a) => {
                let s = self.service("IPVS_CMD_DEL_DEST", k)?;
                if s.dests.remove(a).is_none() {
                    return Err(refused("IPVS_CMD_DEL_DEST", a.to_string(), libc::ENOENT));
                }
            }
        }
        self.applied += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::{RealServer, VirtualServer};
    use super::*;
    use crate::model::Protocol;

    fn vs(sched: &str) -> VirtualServer {
        VirtualServer {
            key: ServiceKey {
                addr: "10.96.0.10".parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 80,
            },
            scheduler: sched.into(),
            persistent_timeout: None,
        }
    }

    fn errno(e: IpvsError) -> Option<i32> {
        match e {
            IpvsError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    #[test]
    fn the_fake_rejects_what_the_kernel_rejects() {
        let mut f = FakeIpvs::default();
        let d = RealServer::new("10.244.1.10:8080".parse().unwrap(), 1);
        let k = vs("rr").key;
        assert_eq!(
            errno(f.apply(&Op::AddService(vs("nope"))).unwrap_err()),
            Some(libc::ENOENT)
        );
        assert_eq!(
            errno(f.apply(&Op::AddDest(k, d)).unwrap_err()),
            Some(libc::ESRCH)
        );
        assert_eq!(
            errno(f.apply(&Op::DelService(k)).unwrap_err()),
            Some(libc::ESRCH)
        );
        f.apply(&Op::AddService(vs("rr"))).unwrap();
        assert_eq!(
            errno(f.apply(&Op::AddService(vs("rr"))).unwrap_err()),
            Some(libc::EEXIST)
        );
        assert_eq!(
            errno(f.apply(&Op::DelDest(k, d.addr)).unwrap_err()),
            Some(libc::ENOENT)
        );
        f.apply(&Op::AddDest(k, d)).unwrap();
        assert_eq!(
            errno(f.apply(&Op::AddDest(k, d)).unwrap_err()),
            Some(libc::EEXIST)
        );
        f.apply(&Op::DelService(k)).unwrap();
        assert!(f.dump().unwrap().is_empty());
    }
}
