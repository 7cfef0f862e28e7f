//! `--source dir:PATH`: Services, EndpointSlices and Nodes read from YAML files in a
//! directory (multi-document files and `kind: List`), re-read whenever the directory changes.
//!
//! # An object defined more than once
//!
//! When several documents define the same object (same kind and `namespace/name`), in one
//! file or in several, the first *valid* definition in path order wins: files sorted by name
//! (byte-wise), then documents in file order. Later definitions are reported as duplicates
//! and ignored while it stays. An invalid definition never displaces a valid one, wherever
//! it is; when no definition is valid, the last good version stays programmed. Removing or
//! changing one definition hands the object to the next one; the object is deleted only when
//! no file defines it any more.
//!
//! # A file that does not parse
//!
//! A file that cannot be read or parsed to its end (say, half written) is reported (a
//! warning naming the file and document, and its objects as `RelistInvalid` in a relist)
//! and keeps the objects last read from it, at their programmed versions, until it parses
//! again or is removed; as a definition it still counts as valid. A file that never parsed
//! contributes the documents before the error.

use super::{Kind, Object, ObjectRef, SourceUpdate};
use crate::objects::ObjectKey;
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc::Sender;

/// One document that could not be used, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentError {
    /// The file.
    pub file: PathBuf,
    /// 0-based document index in the file (and item index inside a `List`).
    pub index: String,
    /// `Kind namespace/name`, when it could be read.
    pub object: Option<String>,
    /// Path of the offending field, when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// The object, when it exists but its content is invalid (its last good version stays).
    pub invalid_object: Option<ObjectRef>,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.index)?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What a directory scan found.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Usable objects, in file order.
    pub objects: Vec<Object>,
    /// Documents skipped, with the reason.
    pub errors: Vec<DocumentError>,
}

/// The directory itself cannot be read or watched.
#[derive(Debug, thiserror::Error)]
pub enum DirSourceError {
    /// Listing the directory failed.
    #[error("reading manifest directory {path}: {source}")]
    Read {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Setting up the watch failed.
    #[error("watching manifest directory {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The watcher's error.
        source: notify::Error,
    },
}

/// The manifest files directly in `dir` (`*.yaml`, `*.yml`, `*.json`, not hidden), sorted.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, DirSourceError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DirSourceError::Read {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.')
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every manifest file in `dir`, handing each usable object and each error to the
/// callbacks as it goes (no list of all objects is built). An object defined more than once
/// is handed over once, as its first valid definition (see the module documentation).
pub fn scan_dir(
    dir: &Path,
    mut on_object: impl FnMut(Object),
    mut on_error: impl FnMut(DocumentError),
) -> Result<(), DirSourceError> {
    let mut seen = BTreeSet::new();
    for file in manifest_files(dir)? {
        let (_, text) = read_manifest(&file);
        scan_text(&file, &text, &mut seen, &mut |found| match found {
            Found::Object(o) => on_object(o),
            Found::Error(e) => on_error(e),
        });
    }
    Ok(())
}

/// What identifies an object across files.
type Id = (Kind, ObjectKey);

/// What [`scan_text`] hands over as it reads.
// Each is handed over once, right away; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
enum Found {
    /// A usable object.
    Object(Object),
    /// A document that could not be used.
    Error(DocumentError),
}

/// What one file defines.
#[derive(Debug, Default)]
struct FileScan {
    /// Every object the file names, and whether one of its definitions of it is valid.
    defs: BTreeMap<Id, bool>,
    /// The file could not be read or parsed to its end.
    broken: bool,
}

/// A file's digest (0 when it cannot be read) and its text (or why it cannot be read).
fn read_manifest(file: &Path) -> (u64, Result<String, String>) {
    match std::fs::read(file) {
        Ok(bytes) => (
            content_digest(&bytes),
            String::from_utf8(bytes).map_err(|e| e.to_string()),
        ),
        Err(e) => (0, Err(e.to_string())),
    }
}

/// Reads one manifest file's text. `seen` holds the objects already used (from this file or
/// files before it): a later valid definition is reported as a duplicate and not handed
/// over. When the text does not parse to its end, the documents before the error are still
/// handed over and the result is marked broken.
fn scan_text(
    file: &Path,
    text: &Result<String, String>,
    seen: &mut BTreeSet<Id>,
    on: &mut impl FnMut(Found),
) -> FileScan {
    let mut scan = FileScan::default();
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            on(Found::Error(doc_error(
                file,
                "0".into(),
                None,
                None,
                e.clone(),
            )));
            scan.broken = true;
            return scan;
        }
    };
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // The rest of the file cannot be parsed either.
                on(Found::Error(doc_error(
                    file,
                    i.to_string(),
                    None,
                    None,
                    e.to_string(),
                )));
                scan.broken = true;
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let items: Vec<(String, Value)> =
            if value.get("kind").and_then(Value::as_str) == Some("List") {
                match value.get("items").and_then(Value::as_sequence) {
                    Some(items) => items
                        .iter()
                        .enumerate()
                        .map(|(j, v)| (format!("{i} item {j}"), v.clone()))
                        .collect(),
                    None => Vec::new(),
                }
            } else {
                vec![(i.to_string(), value)]
            };
        for (index, v) in items {
            match parse_object(v) {
                Ok(None) => {}
                Ok(Some(obj)) => {
                    let id = (obj.kind(), obj.key());
                    scan.defs.insert(id.clone(), true);
                    if seen.insert(id) {
                        on(Found::Object(obj));
                    } else {
                        on(Found::Error(doc_error(
                            file,
                            index,
                            Some(describe(&obj)),
                            None,
                            "duplicate object; the first one is used".into(),
                        )));
                    }
                }
                Err(err) => {
                    let (object, field, message, target) = *err;
                    if let Some(r) = &target {
                        scan.defs.entry((r.kind, r.key.clone())).or_insert(false);
                    }
                    let mut e = doc_error(file, index, object, field, message);
                    e.invalid_object = target;
                    on(Found::Error(e))
                }
            }
        }
    }
    scan
}

fn content_digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Reads the manifests in `text` as the file `name` would be read (fixtures and tests).
pub fn load_text(name: &Path, text: &str) -> Loaded {
    let mut out = Loaded::default();
    let mut seen = BTreeSet::new();
    scan_text(
        name,
        &Ok(text.to_owned()),
        &mut seen,
        &mut |found| match found {
            Found::Object(o) => out.objects.push(o),
            Found::Error(e) => out.errors.push(e),
        },
    );
    out
}

/// Reads every manifest file in `dir` into one list.
pub fn load_dir(dir: &Path) -> Result<Loaded, DirSourceError> {
    let mut out = Loaded::default();
    let mut errors = Vec::new();
    scan_dir(dir, |o| out.objects.push(o), |e| errors.push(e))?;
    out.errors = errors;
    Ok(out)
}

/// What the watcher last made of one file.
#[derive(Debug)]
struct FileState {
    /// Digest of the contents last read.
    digest: u64,
    /// The objects in effect from this file (for a broken file, those of its last read
    /// that parsed), and whether a definition of each is valid.
    defs: BTreeMap<Id, bool>,
    /// The contents last read do not parse.
    broken: bool,
}

/// What the watcher knows of the files it sent.
#[derive(Debug, Default)]
struct Sent {
    files: BTreeMap<PathBuf, FileState>,
}

impl Sent {
    /// Records a file's state; returns the objects it defined before.
    fn insert(&mut self, file: PathBuf, state: FileState) -> BTreeMap<Id, bool> {
        self.files
            .insert(file, state)
            .map(|s| s.defs)
            .unwrap_or_default()
    }

    /// Forgets a file; returns the objects it defined.
    fn remove(&mut self, file: &Path) -> BTreeMap<Id, bool> {
        self.files.remove(file).map(|s| s.defs).unwrap_or_default()
    }

    /// How many files define an object (validly or not). Counted on demand rather than
    /// kept in an index: a directory has few files, and an index of every object would
    /// cost as much memory as the per-file sets themselves.
    fn owners(&self, id: &Id) -> usize {
        self.files
            .values()
            .filter(|f| f.defs.contains_key(id))
            .count()
    }
}

/// Logs a document error with structured fields.
fn report(e: &DocumentError) {
    tracing::warn!(
        file = %e.file.display(),
        document = %e.index,
        object = e.object.as_deref().unwrap_or(""),
        field = e.field.as_deref().unwrap_or(""),
        "skipping invalid manifest: {}",
        e.message
    );
}

fn log_kept(file: &Path, kept: usize) {
    tracing::warn!(
        file = %file.display(),
        kept,
        "manifest file does not parse; keeping the objects last read from it"
    );
}

fn object_ref((kind, key): &Id) -> ObjectRef {
    ObjectRef {
        kind: *kind,
        key: key.clone(),
    }
}

/// Sends a complete listing of `files`. A broken file that `prev` knows keeps the objects
/// it had there: they are listed as `RelistInvalid`, so their programmed versions stay.
fn relist(
    path: &Path,
    files: &[PathBuf],
    prev: Option<&Sent>,
    send: &mut impl FnMut(SourceUpdate),
    report: &mut impl FnMut(&DocumentError),
) -> Sent {
    for kind in Kind::ALL {
        send(SourceUpdate::RelistStart(kind));
    }
    let mut seen = BTreeSet::new();
    let mut state = Sent::default();
    let (mut objects, mut errors) = (0usize, 0usize);
    for file in files {
        let (digest, text) = read_manifest(file);
        let last = prev.and_then(|p| p.files.get(file));
        let keep = last.filter(|last| {
            if last.digest == digest {
                last.broken
            } else {
                // Items sent from it would replace the kept versions: find out whether
                // the file parses before sending any.
                let check = scan_text(file, &text, &mut BTreeSet::new(), &mut |_| {});
                check.broken
            }
        });
        let (defs, broken) = match keep {
            Some(last) => {
                scan_text(file, &text, &mut BTreeSet::new(), &mut |found| {
                    if let Found::Error(e) = found {
                        errors += 1;
                        report(&e);
                    }
                });
                log_kept(file, last.defs.len());
                for (id, valid) in &last.defs {
                    if *valid {
                        // Kept objects take precedence like the valid definitions they were.
                        seen.insert(id.clone());
                    }
                    send(SourceUpdate::RelistInvalid(object_ref(id)));
                }
                (last.defs.clone(), true)
            }
            None => {
                let scan = scan_text(file, &text, &mut seen, &mut |found| match found {
                    Found::Object(o) => {
                        objects += 1;
                        send(SourceUpdate::RelistItem(o));
                    }
                    Found::Error(e) => {
                        errors += 1;
                        report(&e);
                        if let Some(r) = e.invalid_object {
                            send(SourceUpdate::RelistInvalid(r));
                        }
                    }
                });
                (scan.defs, scan.broken)
            }
        };
        state.insert(
            file.clone(),
            FileState {
                digest,
                defs,
                broken,
            },
        );
    }
    for kind in Kind::ALL {
        send(SourceUpdate::RelistDone(kind));
    }
    send(SourceUpdate::Synced);
    tracing::info!(path = %path.display(), objects, errors, "manifests loaded");
    state
}

/// One changed file, read once.
struct Changed {
    file: PathBuf,
    digest: u64,
    text: Result<String, String>,
    /// What it defines now (what it defined before when it is broken and was known).
    scan: FileScan,
    /// It does not parse and keeps the objects last read from it.
    kept: bool,
    /// Its errors, reported when no relist follows (a relist reports them itself).
    errors: Vec<DocumentError>,
}

/// Sends what changed in the directory since `sent` (None: nothing sent yet).
///
/// The first time, a full relist. Afterwards the cheap path: the objects of changed files
/// as upserts and deletions of objects no file defines any more; except when a change
/// touches an object that more than one file defines (before or after the change), where
/// the precedence between the definitions matters: then a full relist.
fn apply_changes(
    path: &Path,
    sent: &mut Option<Sent>,
    send: &mut impl FnMut(SourceUpdate),
    report: &mut impl FnMut(&DocumentError),
) -> Result<(), DirSourceError> {
    let files = manifest_files(path)?;
    let Some(mut prev) = sent.take() else {
        *sent = Some(relist(path, &files, None, send, report));
        return Ok(());
    };
    let mut changed = Vec::new();
    for file in &files {
        let (digest, text) = read_manifest(file);
        let last = prev.files.get(file);
        if last.map(|s| s.digest) == Some(digest) {
            continue;
        }
        let mut errors = Vec::new();
        let mut scan = scan_text(file, &text, &mut BTreeSet::new(), &mut |found| {
            if let Found::Error(e) = found {
                errors.push(e);
            }
        });
        let kept = match last {
            Some(last) if scan.broken => {
                scan.defs = last.defs.clone();
                true
            }
            _ => false,
        };
        changed.push(Changed {
            file: file.clone(),
            digest,
            text,
            scan,
            kept,
            errors,
        });
    }
    let removed: Vec<PathBuf> = prev
        .files
        .keys()
        .filter(|f| files.binary_search(f).is_err())
        .cloned()
        .collect();
    if changed.is_empty() && removed.is_empty() {
        *sent = Some(prev);
        return Ok(());
    }
    // How many more (or fewer) files define each touched object after the change.
    let mut delta: BTreeMap<Id, isize> = BTreeMap::new();
    for c in changed.iter().filter(|c| !c.kept) {
        let old = prev.files.get(&c.file).map(|s| &s.defs);
        for id in old.into_iter().flat_map(BTreeMap::keys) {
            *delta.entry(id.clone()).or_default() -= 1;
        }
        for id in c.scan.defs.keys() {
            *delta.entry(id.clone()).or_default() += 1;
        }
    }
    for file in &removed {
        for id in prev.files.get(file).into_iter().flat_map(|s| s.defs.keys()) {
            *delta.entry(id.clone()).or_default() -= 1;
        }
    }
    let shared = delta.iter().find(|(id, d)| {
        let before = prev.owners(id);
        before > 1 || before.saturating_add_signed(**d) > 1
    });
    if let Some(((kind, key), _)) = shared {
        tracing::info!(kind = ?kind, object = %key, "change touches an object defined in several files; relisting");
        *sent = Some(relist(path, &files, Some(&prev), send, report));
        return Ok(());
    }
    // Every touched object is defined in at most one file, before and after.
    let mut gone = BTreeSet::new();
    for c in changed {
        for e in &c.errors {
            report(e);
        }
        if c.kept {
            log_kept(&c.file, c.scan.defs.len());
            if let Some(s) = prev.files.get_mut(&c.file) {
                s.digest = c.digest;
                s.broken = true;
            }
            continue;
        }
        let mut upserts = 0usize;
        scan_text(&c.file, &c.text, &mut BTreeSet::new(), &mut |found| {
            if let Found::Object(o) = found {
                upserts += 1;
                send(SourceUpdate::Upsert(o));
            }
        });
        let state = FileState {
            digest: c.digest,
            broken: c.scan.broken,
            defs: c.scan.defs,
        };
        let new_ids: BTreeSet<Id> = state.defs.keys().cloned().collect();
        let old = prev.insert(c.file.clone(), state);
        gone.extend(old.into_keys().filter(|id| !new_ids.contains(id)));
        tracing::info!(file = %c.file.display(), objects = upserts, "manifest file changed");
    }
    for file in removed {
        gone.extend(prev.remove(&file).into_keys());
        tracing::info!(file = %file.display(), "manifest file removed");
    }
    // An object that moved to another file is still defined: not deleted.
    for id in gone.iter().filter(|id| prev.owners(id) == 0) {
        send(SourceUpdate::Delete(object_ref(id)));
    }
    *sent = Some(prev);
    Ok(())
}

/// [`apply_changes`] into a channel, logging errors. Returns false when the receiver is gone.
fn send_changes(
    path: &Path,
    tx: &Sender<SourceUpdate>,
    sent: &mut Option<Sent>,
) -> Result<bool, DirSourceError> {
    let mut closed = false;
    apply_changes(
        path,
        sent,
        &mut |u| {
            if tx.blocking_send(u).is_err() {
                closed = true;
            }
        },
        &mut report,
    )?;
    Ok(!closed)
}

fn doc_error(
    file: &Path,
    index: String,
    object: Option<String>,
    field: Option<String>,
    message: String,
) -> DocumentError {
    DocumentError {
        file: file.to_owned(),
        index,
        object,
        field,
        message,
        invalid_object: None,
    }
}

fn describe(obj: &Object) -> String {
    format!("{:?} {}", obj.kind(), obj.key())
}

/// Why a document was not used: (object label, field, message, the object it names when
/// that object exists but is invalid).
type ParseError = Box<(Option<String>, Option<String>, String, Option<ObjectRef>)>;

/// Decides the kind from the raw document, then deserializes it into the typed object.
fn parse_object(v: Value) -> Result<Option<Object>, ParseError> {
    if !v.is_mapping() {
        return Err(Box::new((
            None,
            None,
            "document is not a mapping".into(),
            None,
        )));
    }
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let api = v
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    let label = match ns {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    if kind.is_empty() {
        return Err(Box::new((
            None,
            Some("kind".into()),
            "missing".into(),
            None,
        )));
    }
    let want_api = match kind.as_str() {
        "Service" | "Node" | "Pod" | "Namespace" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "NetworkPolicy" => "networking.k8s.io/v1",
        other => {
            tracing::debug!(kind = other, "skipping object of a kind weir does not read");
            return Ok(None);
        }
    };
    if api != want_api {
        return Err(Box::new((
            Some(label),
            Some("apiVersion".into()),
            format!("{api:?} is not supported for {kind} (want {want_api})"),
            None,
        )));
    }
    if name.is_empty() {
        return Err(Box::new((
            Some(label),
            Some("metadata.name".into()),
            "missing".into(),
            None,
        )));
    }
    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            (path, e.into_inner().to_string())
        })
    }
    let key = match kind.as_str() {
        "Node" | "Namespace" => ObjectKey::new("", name),
        _ => ObjectKey::new(ns.unwrap_or("default"), name),
    };
    let (res, target) = match kind.as_str() {
        "Service" => (typed(v).map(Object::Service), Kind::Service),
        "EndpointSlice" => (typed(v).map(Object::EndpointSlice), Kind::EndpointSlice),
        "Pod" => (typed(v).map(Object::Pod), Kind::Pod),
        "Namespace" => (typed(v).map(Object::Namespace), Kind::Namespace),
        "NetworkPolicy" => (typed(v).map(Object::NetworkPolicy), Kind::NetworkPolicy),
        _ => (typed(v).map(Object::Node), Kind::Node),
    };
    res.map(Some).map_err(|(field, message)| {
        let target = ObjectRef { kind: target, key };
        Box::new((
            Some(label),
            Some(field).filter(|f| f != "."),
            message,
            Some(target),
        ))
    })
}

/// Sends the directory's objects as a listing of every kind (a `RelistStart` per kind, one
/// `RelistItem` per object, a `RelistDone` per kind, `Synced`), then, after every change of the files (debounced), the objects of the
/// changed files and deletions of what no file holds any more, or a relist when the change
/// touches an object several files define. Returns when the receiver is gone.
pub async fn run(path: PathBuf, tx: Sender<SourceUpdate>) -> Result<(), DirSourceError> {
    use notify::Watcher;
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = wake_tx.send(());
        }
    })
    .map_err(|source| DirSourceError::Watch {
        path: path.clone(),
        source,
    })?;
    watcher
        .watch(&path, notify::RecursiveMode::NonRecursive)
        .map_err(|source| DirSourceError::Watch {
            path: path.clone(),
            source,
        })?;
    let mut sent: Option<Sent> = None;
    loop {
        // Parsing blocks; it runs on a blocking thread and hands objects over one by one
        // through the bounded channel, so they never pile up in memory.
        let (scan_path, scan_tx) = (path.clone(), tx.clone());
        let (open, state) = tokio::task::spawn_blocking(move || {
            let r = send_changes(&scan_path, &scan_tx, &mut sent);
            (r, sent)
        })
        .await
        .unwrap_or((Ok(false), None));
        sent = state;
        if !open? {
            return Ok(());
        }
        // Wait for a change, then let a burst of events settle.
        tokio::select! {
            woke = wake_rx.recv() => if woke.is_none() { return Ok(()) },
            _ = tx.closed() => return Ok(()),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        while wake_rx.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: demo}
spec: {clusterIP: 10.96.0.11, ports: [{port: eighty}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.11]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"#;

    #[test]
    fn invalid_document_is_reported_with_file_index_object_and_field_and_others_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        assert_eq!(loaded.objects.len(), 2);
        assert_eq!(loaded.errors.len(), 1);
        let e = &loaded.errors[0];
        assert_eq!(e.index, "1");
        assert_eq!(e.object.as_deref(), Some("Service demo/broken"));
        assert_eq!(e.field.as_deref(), Some("spec.ports[0].port"));
        assert!(
            e.to_string()
                .contains("a.yaml document 1: Service demo/broken: field spec.ports[0].port"),
            "{e}"
        );
    }

    #[test]
    fn pods_namespaces_and_network_policies_are_read_with_their_api_versions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\nstatus: {podIP: 10.244.0.5}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n---\napiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: old, namespace: x}\nspec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: typo, namespace: x}\nspec: {podSelector: {matchLabels: 7}}\n",
        )
        .unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        let kinds: Vec<String> = loaded
            .objects
            .iter()
            .map(|o| format!("{} {}", o.kind(), o.key()))
            .collect();
        assert_eq!(kinds, ["Namespace x", "Pod x/a", "NetworkPolicy x/deny"]);
        let msgs: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:#?}");
        assert!(
            msgs[0].contains("NetworkPolicy x/old: field apiVersion"),
            "{msgs:#?}"
        );
        assert!(
            msgs[1].contains("NetworkPolicy x/typo: field spec.podSelector.matchLabels"),
            "{msgs:#?}"
        );
    }

    #[test]
    fn list_items_wrong_api_version_missing_name_and_duplicates_are_handled() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: node1}}\n- {apiVersion: v1, kind: Node, metadata: {name: node1}}\n- {apiVersion: v2, kind: Service, metadata: {name: x}}\n- {apiVersion: v1, kind: Service, metadata: {namespace: x}}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("c.yaml"), "key: [unclosed").unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        assert_eq!(loaded.objects.len(), 1);
        let msgs: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 4, "{msgs:#?}");
        assert!(
            msgs[0].contains("document 0 item 1: Node node1: duplicate"),
            "{msgs:#?}"
        );
        assert!(
            msgs[1].contains("item 2: Service x: field apiVersion"),
            "{msgs:#?}"
        );
        assert!(
            msgs[2].contains("item 3: Service x/: field metadata.name"),
            "{msgs:#?}"
        );
        assert!(msgs[3].contains("c.yaml document 0"), "{msgs:#?}");
    }

    /// Everything received until the source is quiet for a moment, as short strings.
    async fn drain(rx: &mut tokio::sync::mpsc::Receiver<SourceUpdate>) -> Vec<String> {
        let mut out = Vec::new();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let mut next = Some(first);
        while let Some(u) = next {
            out.push(short(&u));
            out.retain(|w| !w.is_empty());
            next = tokio::time::timeout(Duration::from_millis(400), rx.recv())
                .await
                .ok()
                .flatten();
        }
        out
    }

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    const INVALID_WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.9, ports: [{port: eighty}]}\n";

    /// What a step sent, one word per update; a listing of every kind reads as one
    /// `start` and one `done`.
    fn short(u: &SourceUpdate) -> String {
        match u {
            SourceUpdate::RelistStart(k) if *k == Kind::ALL[0] => "start".to_owned(),
            SourceUpdate::RelistDone(k) if *k == Kind::ALL[5] => "done".to_owned(),
            SourceUpdate::RelistStart(_) | SourceUpdate::RelistDone(_) | SourceUpdate::Synced => {
                String::new()
            }
            SourceUpdate::RelistItem(o) => format!("item {}", o.key()),
            SourceUpdate::RelistInvalid(r) => format!("invalid {}", r.key),
            SourceUpdate::Upsert(o) => format!("upsert {}", o.key()),
            SourceUpdate::Delete(r) => format!("delete {}", r.key),
        }
    }

    /// A directory, the source's state and a store fed with what the source sends.
    struct Harness {
        dir: tempfile::TempDir,
        sent: Option<Sent>,
        store: crate::model::Store,
        /// The errors the last step reported.
        errors: Vec<String>,
    }

    impl Harness {
        fn new(files: &[(&str, &str)]) -> Self {
            let h = Harness {
                dir: tempfile::tempdir().unwrap(),
                sent: None,
                store: crate::model::Store::default(),
                errors: Vec::new(),
            };
            for (name, text) in files {
                h.write(name, text);
            }
            h
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.dir.path().join(name), text).unwrap();
        }

        fn remove(&self, name: &str) {
            std::fs::remove_file(self.dir.path().join(name)).unwrap();
        }

        /// One pass of the source, as after a change event; the updates it sent, in short.
        fn step(&mut self) -> Vec<String> {
            let mut updates = Vec::new();
            self.errors.clear();
            apply_changes(
                self.dir.path(),
                &mut self.sent,
                &mut |u| updates.push(u),
                &mut |e| self.errors.push(e.to_string()),
            )
            .unwrap();
            let mut out = Vec::new();
            for u in updates {
                out.push(short(&u));
                out.retain(|w| !w.is_empty());
                self.store.record(u, std::time::SystemTime::now());
            }
            out
        }

        /// The Service `demo/NAME` as the store holds it, debug-printed; None when absent.
        fn service(&self, name: &str) -> Option<String> {
            self.store
                .services()
                .get(&ObjectKey::new("demo", name))
                .map(|r| format!("{r:?}"))
        }
    }

    #[test]
    fn object_defined_in_two_files_stays_while_one_file_still_defines_it() {
        let mut h = Harness::new(&[
            ("a.yaml", &svc("web", "10.96.0.1")),
            ("b.yaml", &svc("web", "10.96.0.2")),
        ]);
        assert_eq!(h.step(), ["start", "item demo/web", "done"]);
        assert!(h.service("web").unwrap().contains("10.96.0.1"));
        h.remove("a.yaml");
        let out = h.step();
        assert!(!out.contains(&"delete demo/web".to_owned()), "{out:?}");
        // The remaining definition is in effect.
        assert!(h.service("web").unwrap().contains("10.96.0.2"), "{out:?}");
        h.remove("b.yaml");
        h.step();
        assert_eq!(h.service("web"), None);
    }

    #[test]
    fn removing_a_file_with_an_invalid_duplicate_keeps_the_valid_object() {
        // The invalid definition after the valid one, then before it.
        for (invalid, valid) in [("b.yaml", "a.yaml"), ("a.yaml", "b.yaml")] {
            let mut h = Harness::new(&[(valid, &svc("web", "10.96.0.1")), (invalid, INVALID_WEB)]);
            h.step();
            assert!(h.service("web").unwrap().contains("10.96.0.1"));
            h.remove(invalid);
            let out = h.step();
            assert!(!out.contains(&"delete demo/web".to_owned()), "{out:?}");
            assert!(h.service("web").unwrap().contains("10.96.0.1"), "{out:?}");
        }
    }

    #[test]
    fn unparseable_file_keeps_its_last_objects_until_it_parses_or_is_removed() {
        let both = format!(
            "{}---\n{}",
            svc("web", "10.96.0.1"),
            svc("api", "10.96.0.2")
        );
        let mut h = Harness::new(&[("a.yaml", &both)]);
        h.step();
        // Half-written: the second document is cut off inside a flow mapping.
        let half = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: api, namesp",
            svc("web", "10.96.0.3")
        );
        h.write("a.yaml", &half);
        assert_eq!(h.step(), Vec::<String>::new());
        assert_eq!(h.errors.len(), 1, "{:?}", h.errors);
        assert!(h.errors[0].contains("a.yaml document 1"), "{:?}", h.errors);
        assert!(h.service("api").unwrap().contains("10.96.0.2"));
        assert!(h.service("web").unwrap().contains("10.96.0.1"));
        // A relist (here caused by a duplicate elsewhere) keeps them too.
        h.write("b.yaml", &svc("api", "10.96.0.4"));
        let out = h.step();
        assert!(out.contains(&"start".to_owned()), "{out:?}");
        assert!(out.contains(&"invalid demo/api".to_owned()), "{out:?}");
        assert!(h.errors.iter().any(|e| e.contains("a.yaml document 1")));
        assert!(h.service("api").unwrap().contains("10.96.0.2"), "{out:?}");
        assert!(h.service("web").unwrap().contains("10.96.0.1"), "{out:?}");
        h.remove("b.yaml");
        h.step();
        // Parses again: its current objects are in effect.
        h.write("a.yaml", &svc("web", "10.96.0.5"));
        let mut out = h.step();
        out.sort();
        assert_eq!(out, ["delete demo/api", "upsert demo/web"]);
        assert!(h.service("web").unwrap().contains("10.96.0.5"));
        // Removed while unparseable: its objects go.
        h.write("a.yaml", &half);
        assert_eq!(h.step(), Vec::<String>::new());
        h.remove("a.yaml");
        assert_eq!(h.step(), ["delete demo/web"]);
    }

    #[test]
    fn first_valid_definition_in_path_order_wins() {
        let mut h = Harness::new(&[
            ("b.yaml", &svc("web", "10.96.0.2")),
            ("a.yaml", &svc("web", "10.96.0.1")),
        ]);
        assert_eq!(h.step(), ["start", "item demo/web", "done"]);
        assert!(h.service("web").unwrap().contains("10.96.0.1"));
        assert!(h
            .errors
            .iter()
            .any(|e| e.contains("b.yaml document 0") && e.contains("duplicate")));
        // Changing the losing definition changes nothing.
        h.write("b.yaml", &svc("web", "10.96.0.3"));
        h.step();
        assert!(h.service("web").unwrap().contains("10.96.0.1"));
        // Changing the winning one takes effect.
        h.write("a.yaml", &svc("web", "10.96.0.4"));
        h.step();
        assert!(h.service("web").unwrap().contains("10.96.0.4"));
        // An invalid definition never displaces a valid one, wherever it is.
        h.write("a.yaml", INVALID_WEB);
        h.step();
        assert!(h.service("web").unwrap().contains("10.96.0.3"));
        // With no valid definition left, the last good version stays.
        h.write("b.yaml", INVALID_WEB);
        let out = h.step();
        assert!(!out.contains(&"delete demo/web".to_owned()), "{out:?}");
        assert!(h.service("web").unwrap().contains("10.96.0.3"));
    }

    #[test]
    fn object_moved_between_files_in_one_change_is_never_deleted() {
        let mut h = Harness::new(&[("a.yaml", ""), ("b.yaml", &svc("web", "10.96.0.1"))]);
        h.step();
        h.write("a.yaml", &svc("web", "10.96.0.2"));
        h.write("b.yaml", "");
        assert_eq!(h.step(), ["upsert demo/web"]);
        assert!(h.service("web").unwrap().contains("10.96.0.2"));
    }

    #[tokio::test]
    async fn run_relists_once_then_sends_only_what_changed_files_hold() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let task = tokio::spawn(run(dir.path().to_owned(), tx));
        assert_eq!(
            drain(&mut rx).await,
            [
                "start",
                "item demo/web",
                "invalid demo/broken",
                "item demo/web-1",
                "done"
            ]
        );
        std::fs::write(
            dir.path().join("n.yaml"),
            "{apiVersion: v1, kind: Node, metadata: {name: node1}}",
        )
        .unwrap();
        assert_eq!(drain(&mut rx).await, ["upsert node1"]);
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let mut gone = drain(&mut rx).await;
        gone.sort();
        assert_eq!(
            gone,
            ["delete demo/broken", "delete demo/web", "delete demo/web-1"]
        );
        drop(rx);
        task.abort();
    }
}
