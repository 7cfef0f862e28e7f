//! `--source dir:PATH`: Services, EndpointSlices and Nodes read from YAML files in a
//! directory (multi-document files and `kind: List`), re-read whenever the directory changes.

use super::{Kind, Object, ObjectRef, SourceUpdate};
use crate::model::ObjectKey;
use serde::Deserialize;
use serde_yaml_ng::Value;
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
    let mut seen = std::collections::BTreeSet::new();
    for file in manifest_files(dir)? {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                on_error(doc_error(&file, "0".into(), None, None, e.to_string()));
                continue;
            }
        };
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = match Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    // The rest of the file cannot be parsed either.
                    on_error(doc_error(&file, i.to_string(), None, None, e.to_string()));
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
                            on_object(obj);
                        } else {
                            on_error(doc_error(
                                &file,
                                index,
                                Some(describe(&obj)),
                                None,
                                "duplicate object; the first one is used".into(),
                            ));
                        }
                    }
                    Err(err) => {
                        let (object, field, message, target) = *err;
                        let mut e = doc_error(&file, index, object, field, message);
                        e.invalid_object = target;
                        on_error(e)
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads every manifest file in `dir` into one list.
pub fn load_dir(dir: &Path) -> Result<Loaded, DirSourceError> {
    let mut out = Loaded::default();
    let mut errors = Vec::new();
    scan_dir(dir, |o| out.objects.push(o), |e| errors.push(e))?;
    out.errors = errors;
    Ok(out)
}

/// Sends one relist of the directory; returns false when the receiver is gone.
fn relist(path: &Path, tx: &Sender<SourceUpdate>) -> Result<bool, DirSourceError> {
    if tx.blocking_send(SourceUpdate::RelistStart).is_err() {
        return Ok(false);
    }
    let (mut objects, mut errors) = (0usize, 0usize);
    let closed = std::cell::Cell::new(false);
    scan_dir(
        path,
        |o| {
            objects += 1;
            if tx.blocking_send(SourceUpdate::RelistItem(o)).is_err() {
                closed.set(true);
            }
        },
        |e| {
            errors += 1;
            if let Some(r) = e.invalid_object.clone() {
                if tx.blocking_send(SourceUpdate::RelistInvalid(r)).is_err() {
                    closed.set(true);
                }
            }
            tracing::warn!(
                file = %e.file.display(),
                document = %e.index,
                object = e.object.as_deref().unwrap_or(""),
                field = e.field.as_deref().unwrap_or(""),
                "skipping invalid manifest: {}",
                e.message
            );
        },
    )?;
    if closed.get() || tx.blocking_send(SourceUpdate::RelistDone).is_err() {
        return Ok(false);
    }
    tracing::info!(path = %path.display(), objects, errors, "manifests loaded");
    Ok(true)
}

/// A digest of the manifest files' names and contents, to skip unchanged rescans.
fn digest(dir: &Path) -> Result<u64, DirSourceError> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for file in manifest_files(dir)? {
        file.hash(&mut h);
        std::fs::read(&file).unwrap_or_default().hash(&mut h);
    }
    Ok(h.finish())
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
/// `RelistDone`), then again after every change of the files (debounced). Returns when the
/// receiver is gone.
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
    let mut last: Option<u64> = None;
    loop {
        let now = digest(&path)?;
        if last != Some(now) {
            last = Some(now);
            // Parsing blocks; it runs on a blocking thread and hands objects over one by
            // one through the bounded channel, so they never pile up in memory.
            let (scan_path, scan_tx) = (path.clone(), tx.clone());
            let scanned = tokio::task::spawn_blocking(move || relist(&scan_path, &scan_tx))
                .await
                .unwrap_or(Ok(false))?;
            if !scanned {
                return Ok(());
            }
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

    async fn next_relist(rx: &mut tokio::sync::mpsc::Receiver<SourceUpdate>) -> usize {
        let mut n = 0;
        loop {
            let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            match u {
                SourceUpdate::RelistStart => n = 0,
                SourceUpdate::RelistItem(_) => n += 1,
                SourceUpdate::RelistInvalid(r) => assert_eq!(r.key.to_string(), "demo/broken"),
                SourceUpdate::RelistDone => return n,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn run_sends_the_objects_again_after_a_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let task = tokio::spawn(run(dir.path().to_owned(), tx));
        assert_eq!(next_relist(&mut rx).await, 2);
        std::fs::write(
            dir.path().join("n.yaml"),
            "{apiVersion: v1, kind: Node, metadata: {name: node1}}",
        )
        .unwrap();
        assert_eq!(next_relist(&mut rx).await, 3);
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(next_relist(&mut rx).await, 1);
        drop(rx);
        task.abort();
    }
}
