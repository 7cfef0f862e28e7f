//! A fake of the services, backends, Maglev and source ranges maps that behaves like BPF
//! hash maps and an LPM trie: a fixed capacity (inserting a new key into a full map fails
//! with E2BIG, ENOSPC for the trie), a prefix longer than the trie's key fails (EINVAL),
//! deleting a missing key fails (ENOENT), and writes are applied one by one (a failed plan
//! stays half applied).

use super::kernel::EbpfError;
use super::render::{MapContents, MapOp, MapPlan};
use super::MapStore;
use std::sync::{Arc, Mutex};

/// The fake maps (shared, so a test keeps a handle while the runner owns another).
#[derive(Clone, Debug)]
pub struct FakeMaps {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    maps: MapContents,
    services_max: usize,
    backends_max: usize,
    applies: usize,
    writes: usize,
    dumps: usize,
    fail_next: bool,
}

impl FakeMaps {
    /// Empty maps with these capacities.
    pub fn with_capacity(services_max: usize, backends_max: usize) -> Self {
        FakeMaps {
            inner: Arc::new(Mutex::new(Inner {
                services_max,
                backends_max,
                ..Inner::default()
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the maps hold.
    pub fn contents(&self) -> MapContents {
        self.lock().maps.clone()
    }

    /// Plans applied successfully.
    pub fn applies(&self) -> usize {
        self.lock().applies
    }

    /// Single map writes done (inserts and deletes).
    pub fn writes(&self) -> usize {
        self.lock().writes
    }

    /// Times the maps were read whole.
    pub fn dumps(&self) -> usize {
        self.lock().dumps
    }

    /// Makes the next plan fail after its first write.
    pub fn fail_next_apply(&self) {
        self.lock().fail_next = true;
    }
}

impl Default for FakeMaps {
    fn default() -> Self {
        FakeMaps::with_capacity(
            weir_ebpf_common::SERVICES_MAX as usize,
            weir_ebpf_common::BACKENDS_MAX as usize,
        )
    }
}

impl MapStore for FakeMaps {
    fn dump(&mut self) -> Result<MapContents, EbpfError> {
        let mut i = self.lock();
        i.dumps += 1;
        Ok(i.maps.clone())
    }

    fn apply(&mut self, plan: &MapPlan) -> Result<(), EbpfError> {
        let mut i = self.lock();
        let fail = std::mem::take(&mut i.fail_next);
        for (n, op) in plan.ops.iter().enumerate() {
            if fail && n == 1 {
                return Err(EbpfError::Map {
                    op: "update",
                    map: "fake",
                    key: format!("{op:?}"),
                    message: "injected failure".into(),
                });
            }
            i.writes += 1;
            let (services_max, backends_max) = (i.services_max, i.backends_max);
            let m = &mut i.maps;
            match op {
                MapOp::UpsertBackend(k, v) => {
                    if !m.backends.contains_key(k) && m.backends.len() >= backends_max {
                        return Err(full("backends", k));
                    }
                    m.backends.insert(*k, *v);
                }
                MapOp::UpsertService(k, v) => {
                    if !m.services.contains_key(k) && m.services.len() >= services_max {
                        return Err(full("services", k));
                    }
                    m.services.insert(*k, *v);
                }
                MapOp::DeleteService(k) => {
                    if m.services.remove(k).is_none() {
                        return Err(missing("services", k));
                    }
                }
                MapOp::DeleteBackend(k) => {
                    if m.backends.remove(k).is_none() {
                        return Err(missing("backends", k));
                    }
                }
                MapOp::UpsertMaglev(k, v) => {
                    m.maglev.insert(*k, *v);
                }
                MapOp::DeleteMaglev(k) => {
                    if m.maglev.remove(k).is_none() {
                        return Err(missing("maglev", k));
                    }
                }
                MapOp::InsertSourceRange(len, k) => {
                    // An LPM trie refuses a prefix longer than its key (EINVAL) and a new
                    // prefix when full (ENOSPC).
                    if *len > weir_ebpf_common::SOURCE_RANGE_BITS {
                        return Err(EbpfError::Map {
                            op: "update",
                            map: "source_ranges",
                            key: format!("{len} {k:?}"),
                            message: "prefix longer than the key (EINVAL)".into(),
                        });
                    }
                    let entry = (*len, *k);
                    if !m.source_ranges.contains(&entry)
                        && m.source_ranges.len() >= weir_ebpf_common::SOURCE_RANGES_MAX as usize
                    {
                        return Err(EbpfError::Map {
                            op: "update",
                            map: "source_ranges",
                            key: format!("{entry:?}"),
                            message: "map is full (ENOSPC)".into(),
                        });
                    }
                    m.source_ranges.insert(entry);
                }
                MapOp::DeleteSourceRange(len, k) => {
                    if !m.source_ranges.remove(&(*len, *k)) {
                        return Err(missing("source_ranges", &(len, k)));
                    }
                }
            }
        }
        i.applies += 1;
        Ok(())
    }
}

fn full(map: &'static str, key: &dyn std::fmt::Debug) -> EbpfError {
    EbpfError::Map {
        op: "update",
        map,
        key: format!("{key:?}"),
        message: "map is full (E2BIG)".into(),
    }
}

fn missing(map: &'static str, key: &dyn std::fmt::Debug) -> EbpfError {
    EbpfError::Map {
        op: "delete",
        map,
        key: format!("{key:?}"),
        message: "no such key (ENOENT)".into(),
    }
}
