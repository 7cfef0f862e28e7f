//! Change trackers: the current objects of one kind plus which of them changed since
//! the last sync. Watch handlers only record here; the sync runner reads and clears.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

pub use crate::objects::ObjectKey;

/// The objects of one kind and the keys changed since the last [`ChangeTracker::take_pending`].
#[derive(Clone, Debug)]
pub struct ChangeTracker<T> {
    objects: BTreeMap<ObjectKey, T>,
    pending: BTreeSet<ObjectKey>,
    oldest_pending: Option<SystemTime>,
    total_changes: u64,
}

impl<T> Default for ChangeTracker<T> {
    fn default() -> Self {
        ChangeTracker {
            objects: BTreeMap::new(),
            pending: BTreeSet::new(),
            oldest_pending: None,
            total_changes: 0,
        }
    }
}

impl<T: PartialEq> ChangeTracker<T> {
    /// Records an add or update; returns whether anything changed.
    pub fn upsert(&mut self, key: ObjectKey, object: T, now: SystemTime) -> bool {
        if self.objects.get(&key) == Some(&object) {
            return false;
        }
        self.objects.insert(key.clone(), object);
        self.mark(key, now);
        true
    }

    /// Records a deletion; returns whether the object was known.
    pub fn delete(&mut self, key: &ObjectKey, now: SystemTime) -> bool {
        if self.objects.remove(key).is_none() {
            return false;
        }
        self.mark(key.clone(), now);
        true
    }

    /// Replaces the whole set of objects (a relist or a directory rescan), recording only
    /// the keys whose object was added, changed or removed. Returns how many changed.
    pub fn replace_all(&mut self, objects: BTreeMap<ObjectKey, T>, now: SystemTime) -> usize {
        let mut changed = 0;
        let removed: Vec<ObjectKey> = self
            .objects
            .keys()
            .filter(|k| !objects.contains_key(*k))
            .cloned()
            .collect();
        for key in removed {
            changed += usize::from(self.delete(&key, now));
        }
        for (key, object) in objects {
            changed += usize::from(self.upsert(key, object, now));
        }
        changed
    }

    fn mark(&mut self, key: ObjectKey, now: SystemTime) {
        self.total_changes += 1;
        self.pending.insert(key);
        if self.oldest_pending.is_none() {
            self.oldest_pending = Some(now);
        }
    }
}

impl<T> ChangeTracker<T> {
    /// The current objects.
    pub fn objects(&self) -> &BTreeMap<ObjectKey, T> {
        &self.objects
    }

    /// Keys changed since the last sync.
    pub fn pending(&self) -> &BTreeSet<ObjectKey> {
        &self.pending
    }

    /// When the oldest change not yet synced was recorded.
    pub fn oldest_pending(&self) -> Option<SystemTime> {
        self.oldest_pending
    }

    /// Changes recorded since start (for `*_changes_total` metrics).
    pub fn total_changes(&self) -> u64 {
        self.total_changes
    }

    /// Clears and returns the pending keys (called once a sync has taken them in).
    pub fn take_pending(&mut self) -> BTreeSet<ObjectKey> {
        self.oldest_pending = None;
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)
    }

    #[test]
    fn identical_upsert_is_not_a_change() {
        let mut tr = ChangeTracker::default();
        assert!(tr.upsert(ObjectKey::new("a", "x"), 1, t(1)));
        tr.take_pending();
        assert!(!tr.upsert(ObjectKey::new("a", "x"), 1, t(2)));
        assert!(tr.pending().is_empty());
        assert_eq!(tr.oldest_pending(), None);
    }

    #[test]
    fn replace_all_records_only_added_changed_and_removed_keys() {
        let mut tr = ChangeTracker::default();
        tr.upsert(ObjectKey::new("a", "keep"), 1, t(1));
        tr.upsert(ObjectKey::new("a", "change"), 1, t(1));
        tr.upsert(ObjectKey::new("a", "gone"), 1, t(1));
        tr.take_pending();
        let next = BTreeMap::from([
            (ObjectKey::new("a", "keep"), 1),
            (ObjectKey::new("a", "change"), 2),
            (ObjectKey::new("a", "new"), 1),
        ]);
        assert_eq!(tr.replace_all(next, t(5)), 3);
        let pending: Vec<String> = tr.pending().iter().map(|k| k.to_string()).collect();
        assert_eq!(pending, ["a/change", "a/gone", "a/new"]);
        assert_eq!(tr.oldest_pending(), Some(t(5)));
        assert_eq!(tr.total_changes(), 6);
    }
}
