//! `--source dir:PATH`: Services, EndpointSlices and Nodes read from YAML files in a
//! directory (multi-document files and `kind: List`), re-read whenever the directory changes.

use super::{Kind, Object, ObjectRef, SourceUpdate};
use crate::model::ObjectKey;
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
/// callbacks as it goes (no list of all objects is built).
pub fn scan_dir(
    dir: &Path,
    mut on_object: impl FnMut(Object),
    mut on_error: impl FnMut(DocumentError),
) -> Result<(), DirSourceError> {
    let mut seen = BTreeSet::new();
    for file in manifest_files(dir)? {
        scan_file(&file, &mut seen, &mut on_object, &mut on_error);
    }
    Ok(())
}

/// What identifies an object across files.
type Id = (Kind, ObjectKey);

/// Reads one manifest file. `seen` holds the objects already read (from this file or
/// others): a second definition is reported as a duplicate. Returns the digest of the file's
/// contents (0 when it could not be read) and the objects it holds, valid or not.
fn scan_file(
    file: &Path,
    seen: &mut BTreeSet<Id>,
    on_object: &mut impl FnMut(Object),
    on_error: &mut impl FnMut(DocumentError),
) -> (u64, BTreeSet<Id>) {
    let mut ids = BTreeSet::new();
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            on_error(doc_error(file, "0".into(), None, None, e.to_string()));
            return (0, ids);
        }
    };
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // The rest of the file cannot be parsed either.
                on_error(doc_error(file, i.to_string(), None, None, e.to_string()));
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
                    if seen.insert((obj.kind(), obj.key())) {
                        ids.insert((obj.kind(), obj.key()));
                        on_object(obj);
                    } else {
                        on_error(doc_error(
                            file,
                            index,
                            Some(describe(&obj)),
                            None,
                            "duplicate object; the first one is used".into(),
                        ));
                    }
                }
                Err(err) => {
                    let (object, field, message, target) = *err;
                    if let Some(r) = &target {
                        ids.insert((r.kind, r.key.clone()));
                    }
                    let mut e = doc_error(file, index, object, field, message);
                    e.invalid_object = target;
                    on_error(e)
                }
            }
        }
    }
    (content_digest(text.as_bytes()), ids)
}

fn content_digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Reads every manifest file in `dir` into one list.
pub fn load_dir(dir: &Path) -> Result<Loaded, DirSourceError> {
    let mut out = Loaded::default();
    let mut errors = Vec::new();
    scan_dir(dir, |o| out.objects.push(o), |e| errors.push(e))?;
    out.errors = errors;
    Ok(out)
}

/// What the watcher knows of the files it sent: their digests and the objects each held.
#[derive(Debug, Default)]
struct Sent {
    files: BTreeMap<PathBuf, (u64, BTreeSet<Id>)>,
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

/// Sends what changed in the directory since `sent`: the first time (or when objects are
/// defined twice) a full relist; afterwards, only the objects of changed files as upserts,
/// and deletions for objects gone from changed or removed files. Returns false when the
/// receiver is gone.
fn send_changes(
    path: &Path,
    tx: &Sender<SourceUpdate>,
    sent: &mut Option<Sent>,
) -> Result<bool, DirSourceError> {
    let files = manifest_files(path)?;
    let digests: BTreeMap<PathBuf, u64> = files
        .iter()
        .map(|f| {
            (
                f.clone(),
                content_digest(&std::fs::read(f).unwrap_or_default()),
            )
        })
        .collect();
    let closed = std::cell::Cell::new(false);
    let send = |u: SourceUpdate| {
        if tx.blocking_send(u).is_err() {
            closed.set(true);
        }
    };
    let Some(prev) = sent.as_mut() else {
        // First view: a complete relist.
        send(SourceUpdate::RelistStart);
        let mut seen = BTreeSet::new();
        let mut state = Sent::default();
        let (mut objects, mut errors) = (0usize, 0usize);
        for file in &files {
            let scanned = scan_file(
                file,
                &mut seen,
                &mut |o| {
                    objects += 1;
                    send(SourceUpdate::RelistItem(o));
                },
                &mut |e| {
                    errors += 1;
                    report(&e);
                    if let Some(r) = e.invalid_object {
                        send(SourceUpdate::RelistInvalid(r));
                    }
                },
            );
            state.files.insert(file.clone(), scanned);
        }
        send(SourceUpdate::RelistDone);
        tracing::info!(path = %path.display(), objects, errors, "manifests loaded");
        *sent = Some(state);
        return Ok(!closed.get());
    };
    let changed: Vec<&PathBuf> = files
        .iter()
        .filter(|f| prev.files.get(*f).map(|(d, _)| d) != digests.get(*f))
        .collect();
    let removed: Vec<PathBuf> = prev
        .files
        .keys()
        .filter(|f| !digests.contains_key(*f))
        .cloned()
        .collect();
    if changed.is_empty() && removed.is_empty() {
        return Ok(true);
    }
    // Objects other files hold, so a changed file's objects can be checked for duplicates.
    let mut duplicate = false;
    for file in changed {
        let mut seen: BTreeSet<Id> = prev
            .files
            .iter()
            .filter(|(f, _)| *f != file)
            .flat_map(|(_, (_, ids))| ids.iter().cloned())
            .collect();
        let mut upserts = 0usize;
        // Objects that are invalid now are in `ids` too: their last good version stays.
        let (digest, ids) = scan_file(
            file,
            &mut seen,
            &mut |o| {
                upserts += 1;
                send(SourceUpdate::Upsert(o));
            },
            &mut |e| {
                duplicate |= e.message.starts_with("duplicate object");
                report(&e);
            },
        );
        let old = prev
            .files
            .insert(file.clone(), (digest, ids.clone()))
            .map(|(_, ids)| ids)
            .unwrap_or_default();
        for (kind, key) in old.difference(&ids) {
            send(SourceUpdate::Delete(ObjectRef {
                kind: *kind,
                key: key.clone(),
            }));
        }
        tracing::info!(file = %file.display(), objects = upserts, "manifest file changed");
    }
    for file in removed {
        if let Some((_, ids)) = prev.files.remove(&file) {
            for (kind, key) in ids {
                send(SourceUpdate::Delete(ObjectRef { kind, key }));
            }
        }
        tracing::info!(file = %file.display(), "manifest file removed");
    }
    if duplicate {
        // An object defined in two files: only a full relist resolves which one wins.
        *sent = None;
        return send_changes(path, tx, sent);
    }
    Ok(!closed.get())
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
        "Service" | "Node" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
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
        "Node" => ObjectKey::new("", name),
        _ => ObjectKey::new(ns.unwrap_or("default"), name),
    };
    let (res, target) = match kind.as_str() {
        "Service" => (typed(v).map(Object::Service), Kind::Service),
        "EndpointSlice" => (typed(v).map(Object::EndpointSlice), Kind::EndpointSlice),
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

/// Sends the directory's objects as a relist (`RelistStart`, one `RelistItem` per object,
/// `RelistDone`), then, after every change of the files (debounced), the objects of the
/// changed files and deletions of what they no longer hold. Returns when the receiver is
/// gone.
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
            out.push(match u {
                SourceUpdate::RelistStart => "start".to_owned(),
                SourceUpdate::RelistDone => "done".to_owned(),
                SourceUpdate::RelistItem(o) => format!("item {}", o.key()),
                SourceUpdate::RelistInvalid(r) => format!("invalid {}", r.key),
                SourceUpdate::Upsert(o) => format!("upsert {}", o.key()),
                SourceUpdate::Delete(r) => format!("delete {}", r.key),
                SourceUpdate::Replace(_) => "replace".to_owned(),
            });
            next = tokio::time::timeout(Duration::from_millis(400), rx.recv())
                .await
                .ok()
                .flatten();
        }
        out
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
