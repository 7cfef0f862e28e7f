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
//!
//! # Reading a changed file
//!
//! A file's text is cut into its documents ([`documents`]); the watcher keeps a digest of
//! each and the objects it named. When the file changes, only the documents whose text is
//! new are parsed and sent (as upserts), and the objects no document names any more are
//! deleted: one edited Service in a file of ten thousand costs one document's parse. A new
//! file's documents are parsed on every core and sent as they are read, in file order.

use super::documents::{self, Piece};
use super::{Kind, Object, ObjectRef, SourceUpdate};
use crate::objects::ObjectKey;
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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
        scan_text(&file, &text, &mut seen, &[], &mut |found| {
            match found {
                Found::Object(o) => on_object(o),
                Found::Error(e) => on_error(e),
            }
            true
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

/// What one piece of a file (see [`documents`]) defined: enough to read the file again
/// without parsing the piece while its text stays the same.
#[derive(Clone, Debug)]
struct PieceMemo {
    /// Digest of the piece's text.
    digest: u64,
    /// Documents in it (the index of every later document counts them).
    docs: usize,
    /// The objects it names, and whether each definition is valid.
    ids: Vec<(Id, bool)>,
}

/// What one file defines.
#[derive(Debug, Default)]
struct FileScan {
    /// Every object the file names, and whether one of its definitions of it is valid.
    defs: BTreeMap<Id, bool>,
    /// The file could not be read or parsed to its end.
    broken: bool,
    /// Some object is named by more than one document of the file.
    dups: bool,
    /// The pieces read, in order, up to a broken one.
    pieces: Vec<PieceMemo>,
    /// The caller stopped the scan.
    stopped: bool,
}

/// A file's digest (0 when it cannot be read) and its text (or why it cannot be read).
fn read_manifest(file: &Path) -> (u64, Result<String, String>) {
    match std::fs::read(file) {
        Ok(bytes) => (
            documents::digest(&bytes),
            String::from_utf8(bytes).map_err(|e| e.to_string()),
        ),
        Err(e) => (0, Err(e.to_string())),
    }
}

/// What one object of a document gave: its index inside a `List`, and the object (None:
/// of a kind weir does not read) or why it cannot be used.
type ItemParse = (Option<usize>, Result<Option<Object>, ParseError>);

/// What one document of a piece held.
enum DocParse {
    /// An empty document.
    Null,
    /// It does not parse, and neither does the rest of the file: the message, with the
    /// file's line numbers.
    Broken(String),
    /// What each object in it gave: (index inside a `List`, the object or why not).
    Items(Vec<ItemParse>),
}

/// Parses one piece into its documents and their objects (on a worker thread).
fn parse_piece(piece: &Piece<'_>) -> Vec<DocParse> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(piece.text) {
        match Value::deserialize(doc) {
            Ok(v) if v.is_null() => out.push(DocParse::Null),
            Ok(v) => out.push(DocParse::Items(items_of(v))),
            Err(_) => {
                out.push(DocParse::Broken(broken_message(piece)));
                break;
            }
        }
    }
    out
}

/// The objects of one document: a `List`'s items with their index, or the document.
fn items_of(mut value: Value) -> Vec<ItemParse> {
    if value.get("kind").and_then(Value::as_str) != Some("List") {
        return vec![(None, parse_object(value))];
    }
    match value.get_mut("items").map(std::mem::take) {
        Some(Value::Sequence(items)) => items
            .into_iter()
            .enumerate()
            .map(|(j, v)| (Some(j), parse_object(v)))
            .collect(),
        _ => Vec::new(),
    }
}

/// A piece's parse error as the whole file's parse reports it: the piece is parsed again
/// after as many empty lines as come before it, so the error's line numbers are the file's.
fn broken_message(piece: &Piece<'_>) -> String {
    let padded = format!("{}{}", "\n".repeat(piece.line), piece.text);
    for doc in serde_yaml_ng::Deserializer::from_str(&padded) {
        if let Err(e) = Value::deserialize(doc) {
            return e.to_string();
        }
    }
    "does not parse".into()
}

/// One scan of a file in progress: what it has found so far.
struct Reading<'a, F> {
    file: &'a Path,
    seen: &'a mut BTreeSet<Id>,
    on: &'a mut F,
    scan: FileScan,
    /// Documents before the next piece.
    docs: usize,
}

impl<F: FnMut(Found) -> bool> Reading<'_, F> {
    /// Records that the file names `id` (validly or not).
    fn define(&mut self, id: &Id, valid: bool) {
        match self.scan.defs.get_mut(id) {
            Some(v) => {
                self.scan.dups = true;
                *v |= valid;
            }
            None => {
                self.scan.defs.insert(id.clone(), valid);
            }
        }
    }

    /// A piece whose text did not change: its objects count as read, and none is handed
    /// over (each is in effect as it was).
    fn reused(&mut self, memo: PieceMemo) {
        for (id, valid) in &memo.ids {
            self.define(id, *valid);
            if *valid {
                self.seen.insert(id.clone());
            }
        }
        self.docs += memo.docs;
        self.scan.pieces.push(memo);
    }

    /// A piece just parsed; false when the scan stops here.
    fn parsed(&mut self, digest: u64, docs: Vec<DocParse>) -> bool {
        let mut memo = PieceMemo {
            digest,
            docs: docs.len(),
            ids: Vec::new(),
        };
        for (j, doc) in docs.into_iter().enumerate() {
            let i = self.docs + j;
            match doc {
                DocParse::Null => {}
                DocParse::Broken(message) => {
                    (self.on)(Found::Error(doc_error(
                        self.file,
                        i.to_string(),
                        None,
                        None,
                        message,
                    )));
                    self.scan.broken = true;
                    return false;
                }
                DocParse::Items(items) => {
                    for (item, res) in items {
                        let index = match item {
                            Some(k) => format!("{i} item {k}"),
                            None => i.to_string(),
                        };
                        if !self.item(index, res, &mut memo) {
                            self.scan.stopped = true;
                            return false;
                        }
                    }
                }
            }
        }
        self.docs += memo.docs;
        self.scan.pieces.push(memo);
        true
    }

    /// One object of a document; false when the caller stops the scan.
    fn item(
        &mut self,
        index: String,
        res: Result<Option<Object>, ParseError>,
        memo: &mut PieceMemo,
    ) -> bool {
        match res {
            Ok(None) => true,
            Ok(Some(obj)) => {
                let id = (obj.kind(), obj.key());
                self.define(&id, true);
                memo.ids.push((id.clone(), true));
                if self.seen.insert(id) {
                    (self.on)(Found::Object(obj))
                } else {
                    (self.on)(Found::Error(doc_error(
                        self.file,
                        index,
                        Some(describe(&obj)),
                        None,
                        "duplicate object; the first one is used".into(),
                    )))
                }
            }
            Err(err) => {
                let (object, field, message, target) = *err;
                if let Some(r) = &target {
                    let id = (r.kind, r.key.clone());
                    self.define(&id, false);
                    memo.ids.push((id, false));
                }
                let mut e = doc_error(self.file, index, object, field, message);
                e.invalid_object = target;
                (self.on)(Found::Error(e))
            }
        }
    }
}

/// Reads one manifest file's text, handing over each usable object and each error to
/// `on`, which may stop the scan by returning false. `seen` holds the objects already used
/// (from this file or files before it): a later valid definition is reported as a
/// duplicate and not handed over. When the text does not parse to its end, the documents
/// before the error are still handed over and the result is marked broken.
///
/// A piece of the text whose digest is in `reuse` (the pieces of the file's last read) is
/// not parsed: its objects count as defined and none is handed over. The other pieces are
/// parsed on worker threads, their results taken in order.
fn scan_text(
    file: &Path,
    text: &Result<String, String>,
    seen: &mut BTreeSet<Id>,
    reuse: &[PieceMemo],
    on: &mut impl FnMut(Found) -> bool,
) -> FileScan {
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
            return FileScan {
                broken: true,
                ..FileScan::default()
            };
        }
    };
    let pieces = documents::split(text);
    let mut old: HashMap<u64, Vec<&PieceMemo>> = HashMap::new();
    for m in reuse.iter().rev() {
        old.entry(m.digest).or_default().push(m);
    }
    // Each piece's digest and, when its text is unchanged, what it defined.
    let mut known: Vec<(u64, Option<PieceMemo>)> = pieces
        .iter()
        .map(|p| {
            let d = documents::digest(p.text.as_bytes());
            let memo = old.get_mut(&d).and_then(Vec::pop).cloned();
            (d, memo)
        })
        .collect();
    let to_parse: Vec<usize> = (0..pieces.len())
        .filter(|&i| known[i].1.is_none())
        .collect();
    let mut reading = Reading {
        file,
        seen,
        on,
        scan: FileScan::default(),
        docs: 0,
    };
    let mut next = 0;
    documents::ordered_map(
        &to_parse,
        documents::workers_for(to_parse.len()),
        |&i| parse_piece(&pieces[i]),
        |k, docs| {
            let i = to_parse[k];
            for memo in known[next..i].iter_mut().filter_map(|k| k.1.take()) {
                reading.reused(memo);
            }
            next = i + 1;
            reading.parsed(known[i].0, docs)
        },
    );
    if !reading.scan.broken && !reading.scan.stopped {
        for memo in known[next..].iter_mut().filter_map(|k| k.1.take()) {
            reading.reused(memo);
        }
    }
    reading.scan
}

/// Reads the manifests in `text` as the file `name` would be read (fixtures and tests).
pub fn load_text(name: &Path, text: &str) -> Loaded {
    let mut out = Loaded::default();
    scan_text(
        name,
        &Ok(text.to_owned()),
        &mut BTreeSet::new(),
        &[],
        &mut |found| {
            match found {
                Found::Object(o) => out.objects.push(o),
                Found::Error(e) => out.errors.push(e),
            }
            true
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
    /// Some object is named by more than one of its documents.
    dups: bool,
    /// What each piece of the text in effect defines (see [`scan_text`]).
    pieces: Vec<PieceMemo>,
}

impl FileState {
    fn new(digest: u64, scan: FileScan) -> Self {
        FileState {
            digest,
            defs: scan.defs,
            broken: scan.broken,
            dups: scan.dups,
            pieces: scan.pieces,
        }
    }
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

    /// Whether a file other than `file` defines an object (validly or not). Looked up on
    /// demand rather than kept in an index: a directory has few files, and an index of
    /// every object would cost as much memory as the per-file sets themselves.
    fn elsewhere(&self, file: &Path, id: &Id) -> bool {
        self.files
            .iter()
            .any(|(f, s)| f != file && s.defs.contains_key(id))
    }

    /// Whether any file defines an object.
    fn defined(&self, id: &Id) -> bool {
        self.files.values().any(|s| s.defs.contains_key(id))
    }

    /// An object `file` defines that another file defines too.
    fn shared_with_others(&self, file: &Path) -> Option<Id> {
        let state = self.files.get(file)?;
        state
            .defs
            .keys()
            .find(|id| self.elsewhere(file, id))
            .cloned()
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
                let check = scan_text(file, &text, &mut BTreeSet::new(), &[], &mut |_| true);
                check.broken
            }
        });
        let file_state = match keep {
            Some(last) => {
                scan_text(file, &text, &mut BTreeSet::new(), &[], &mut |found| {
                    if let Found::Error(e) = found {
                        errors += 1;
                        report(&e);
                    }
                    true
                });
                log_kept(file, last.defs.len());
                for (id, valid) in &last.defs {
                    if *valid {
                        // Kept objects take precedence like the valid definitions they were.
                        seen.insert(id.clone());
                    }
                    send(SourceUpdate::RelistInvalid(object_ref(id)));
                }
                FileState {
                    digest,
                    defs: last.defs.clone(),
                    broken: true,
                    dups: last.dups,
                    pieces: last.pieces.clone(),
                }
            }
            None => {
                let scan = scan_text(file, &text, &mut seen, &[], &mut |found| {
                    match found {
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
                    }
                    true
                });
                FileState::new(digest, scan)
            }
        };
        state.insert(file.clone(), file_state);
    }
    for kind in Kind::ALL {
        send(SourceUpdate::RelistDone(kind));
    }
    send(SourceUpdate::Synced);
    tracing::info!(path = %path.display(), objects, errors, "manifests loaded");
    state
}

/// Objects of a known file's new version held between checking it and sending them; a
/// larger change is parsed again to be sent.
const HOLD: usize = 512;

/// What applying one changed file came to.
enum Applied {
    /// Applied: the objects it no longer defines.
    Done(Vec<Id>),
    /// It names an object another file defines too, so the precedence between the
    /// definitions matters: a full relist is needed.
    Shared(Id),
}

/// Sends what changed in the directory since `sent` (None: nothing sent yet).
///
/// The first time, a full relist. Afterwards the cheap path, file by file, removed files
/// first: a changed file's new and changed objects as upserts (only the pieces of its text
/// that changed are parsed), then deletions of objects no file defines any more; except
/// when a change touches an object that another file defines too, before or after the
/// change, where the precedence between the definitions matters: then a full relist.
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
    let removed: Vec<PathBuf> = prev
        .files
        .keys()
        .filter(|f| files.binary_search(f).is_err())
        .cloned()
        .collect();
    let mut changed = Vec::new();
    for file in &files {
        let (digest, text) = read_manifest(file);
        if prev.files.get(file).map(|s| s.digest) != Some(digest) {
            changed.push((file, digest, text));
        }
    }
    if changed.is_empty() && removed.is_empty() {
        *sent = Some(prev);
        return Ok(());
    }
    let mut gone = BTreeSet::new();
    let shared = removed.iter().find_map(|f| prev.shared_with_others(f));
    let shared = match shared {
        Some(id) => Some(id),
        None => {
            for file in &removed {
                gone.extend(prev.remove(file).into_keys());
                tracing::info!(file = %file.display(), "manifest file removed");
            }
            // A file naming an object that a file still to be applied defines waits for
            // it once (the object may be moving between them); after that it is shared.
            let mut queue: VecDeque<_> = changed.iter().map(|c| (c, false)).collect();
            let mut shared = None;
            while let Some((c, waited)) = queue.pop_front() {
                let (file, digest, text) = c;
                match apply_file(&mut prev, file, *digest, text, send, report) {
                    Applied::Done(ids) => gone.extend(ids),
                    Applied::Shared(id)
                        if !waited
                            && queue.iter().any(|((f, ..), _)| {
                                prev.files.get(*f).is_some_and(|s| s.defs.contains_key(&id))
                            }) =>
                    {
                        queue.push_back((c, true));
                    }
                    Applied::Shared(id) => {
                        shared = Some(id);
                        break;
                    }
                }
            }
            shared
        }
    };
    if let Some((kind, key)) = shared {
        tracing::info!(kind = ?kind, object = %key, "change touches an object defined in several files; relisting");
        *sent = Some(relist(path, &files, Some(&prev), send, report));
        return Ok(());
    }
    // An object that moved to another file is still defined: not deleted.
    for id in gone.iter().filter(|id| !prev.defined(id)) {
        send(SourceUpdate::Delete(object_ref(id)));
    }
    *sent = Some(prev);
    Ok(())
}

/// Applies one changed file to `prev`, sending its objects as upserts, unless it names an
/// object another file defines too.
///
/// A file read before is checked before anything is sent: when it no longer parses, it
/// keeps the objects last read from it, and nothing from its new text is sent. Its
/// objects are held for the sending when they are few, parsed again when not. A new file
/// is sent as it is read: what parses before an error is in effect.
fn apply_file(
    prev: &mut Sent,
    file: &Path,
    digest: u64,
    text: &Result<String, String>,
    send: &mut impl FnMut(SourceUpdate),
    report: &mut impl FnMut(&DocumentError),
) -> Applied {
    if let Some(id) = prev.shared_with_others(file) {
        return Applied::Shared(id);
    }
    let Some(old) = prev.files.get(file) else {
        // A new file: objects are sent as they are read.
        let mut shared = None;
        let mut upserts = 0usize;
        let scan = scan_text(file, text, &mut BTreeSet::new(), &[], &mut |found| {
            let (id, object) = match found {
                Found::Object(o) => ((o.kind(), o.key()), Some(o)),
                Found::Error(e) => {
                    report(&e);
                    match e.invalid_object {
                        Some(r) => ((r.kind, r.key), None),
                        None => return true,
                    }
                }
            };
            if prev.elsewhere(file, &id) {
                shared = Some(id);
                return false;
            }
            if let Some(o) = object {
                upserts += 1;
                send(SourceUpdate::Upsert(o));
            }
            true
        });
        if let Some(id) = shared {
            return Applied::Shared(id);
        }
        tracing::info!(file = %file.display(), objects = upserts, "manifest file added");
        prev.insert(file.to_owned(), FileState::new(digest, scan));
        return Applied::Done(Vec::new());
    };
    // A file read before: its unchanged pieces are not parsed again, unless an object is
    // named twice in it (which definition is first may then have changed).
    let mut reuse: &[PieceMemo] = if old.dups { &[] } else { &old.pieces };
    let check = |reuse: &[PieceMemo]| {
        let (mut held, mut errors) = (Some(Vec::new()), Vec::new());
        let scan = scan_text(file, text, &mut BTreeSet::new(), reuse, &mut |found| {
            match found {
                Found::Object(o) => match &mut held {
                    Some(h) if h.len() < HOLD => h.push(o),
                    _ => held = None,
                },
                Found::Error(e) => errors.push(e),
            }
            true
        });
        (scan, held, errors)
    };
    let (mut scan, mut held, mut errors) = check(reuse);
    if scan.dups && !reuse.is_empty() {
        reuse = &[];
        (scan, held, errors) = check(reuse);
    }
    for e in &errors {
        report(e);
    }
    if scan.broken {
        log_kept(file, old.defs.len());
        if let Some(s) = prev.files.get_mut(file) {
            s.digest = digest;
            s.broken = true;
        }
        return Applied::Done(Vec::new());
    }
    if let Some(id) = scan.defs.keys().find(|id| prev.elsewhere(file, id)) {
        return Applied::Shared(id.clone());
    }
    let mut upserts = 0usize;
    match held {
        Some(objects) => {
            for o in objects {
                upserts += 1;
                send(SourceUpdate::Upsert(o));
            }
        }
        None => {
            scan_text(file, text, &mut BTreeSet::new(), reuse, &mut |found| {
                if let Found::Object(o) = found {
                    upserts += 1;
                    send(SourceUpdate::Upsert(o));
                }
                true
            });
        }
    }
    tracing::info!(file = %file.display(), objects = upserts, "manifest file changed");
    let state = FileState::new(digest, scan);
    let old = prev.insert(file.to_owned(), state);
    let now = &prev.files[file].defs;
    Applied::Done(old.into_keys().filter(|id| !now.contains_key(id)).collect())
}

/// [`apply_changes`] into a channel, logging errors, the updates of one pass framed as a
/// batch (`BatchStart` … `BatchEnd`) so the runner programs them together. Returns false
/// when the receiver is gone.
fn send_changes(
    path: &Path,
    tx: &Sender<SourceUpdate>,
    sent: &mut Option<Sent>,
) -> Result<bool, DirSourceError> {
    let (mut closed, mut started) = (false, false);
    let mut put = |u| {
        if tx.blocking_send(u).is_err() {
            closed = true;
        }
    };
    let result = apply_changes(
        path,
        sent,
        &mut |u| {
            if !started {
                started = true;
                put(SourceUpdate::BatchStart);
            }
            put(u)
        },
        &mut report,
    );
    if started {
        put(SourceUpdate::BatchEnd);
    }
    result?;
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
            SourceUpdate::RelistStart(_)
            | SourceUpdate::RelistDone(_)
            | SourceUpdate::Synced
            | SourceUpdate::BatchStart
            | SourceUpdate::BatchEnd => String::new(),
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

    /// `n` Services in one text, one document each; Service `bad` (when some) invalid.
    fn services(n: usize, bad: Option<usize>) -> String {
        (0..n)
            .map(|i| match bad {
                Some(b) if b == i => INVALID_WEB.replace("name: web", &format!("name: s{i}")),
                _ => svc(&format!("s{i}"), &format!("10.96.1.{}", i + 1)),
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[test]
    fn a_change_to_one_document_parses_and_sends_only_that_document() {
        let mut h = Harness::new(&[("a.yaml", &services(100, None))]);
        assert_eq!(h.step().len(), 102);
        let changed = services(100, None).replace("10.96.1.42,", "10.96.2.42,");
        h.write("a.yaml", &changed);
        assert_eq!(h.step(), ["upsert demo/s41"]);
        assert!(h.service("s41").unwrap().contains("10.96.2.42"));
        // A document removed and one added: the one deletion and the one upsert.
        let fewer = changed.replace(&format!("{}---\n", svc("s7", "10.96.1.8")), "");
        h.write(
            "a.yaml",
            &format!("{fewer}---\n{}", svc("new", "10.96.3.1")),
        );
        let mut out = h.step();
        out.sort();
        assert_eq!(out, ["delete demo/s7", "upsert demo/new"]);
        // Unchanged documents keep their errors out of the log; a new error is reported
        // with its document's index in the file.
        h.write("a.yaml", &services(100, Some(57)));
        h.step();
        assert_eq!(h.errors.len(), 1, "{:?}", h.errors);
        assert!(
            h.errors[0].contains("a.yaml document 57: Service demo/s57"),
            "{:?}",
            h.errors
        );
    }

    #[test]
    fn a_large_new_file_is_read_in_order_with_every_index_right() {
        let text = services(300, Some(250));
        let loaded = load_text(Path::new("big.yaml"), &text);
        let keys: Vec<String> = loaded.objects.iter().map(|o| o.key().to_string()).collect();
        let want: Vec<String> = (0..300)
            .filter(|i| *i != 250)
            .map(|i| format!("demo/s{i}"))
            .collect();
        assert_eq!(keys, want);
        assert_eq!(loaded.errors.len(), 1);
        assert!(
            loaded.errors[0]
                .to_string()
                .contains("big.yaml document 250: Service demo/s250: field spec.ports[0].port"),
            "{}",
            loaded.errors[0]
        );
        // A syntax error is reported at the file's line, as the whole stream reports it.
        let cut = format!("{}---\nkind: [unclosed\n", services(60, None));
        let loaded = load_text(Path::new("cut.yaml"), &cut);
        assert_eq!(loaded.objects.len(), 60);
        let whole = serde_yaml_ng::Deserializer::from_str(&cut)
            .find_map(|d| Value::deserialize(d).err())
            .unwrap()
            .to_string();
        assert!(whole.contains("at line 302 column 1"), "{whole}");
        assert_eq!(loaded.errors[0].message, whole);
        assert_eq!(loaded.errors[0].index, "60");
    }

    #[test]
    fn when_the_first_of_two_definitions_in_a_file_goes_the_second_takes_effect() {
        let two = format!(
            "{}---\n{}",
            svc("web", "10.96.0.1"),
            svc("web", "10.96.0.2")
        );
        let mut h = Harness::new(&[("a.yaml", &two)]);
        h.step();
        assert!(h.service("web").unwrap().contains("10.96.0.1"));
        // The second document's text is unchanged, but it is now the first definition.
        h.write(
            "a.yaml",
            &format!(
                "{}---\n{}",
                svc("api", "10.96.0.3"),
                svc("web", "10.96.0.2")
            ),
        );
        let mut out = h.step();
        out.sort();
        assert_eq!(out, ["upsert demo/api", "upsert demo/web"]);
        assert!(h.service("web").unwrap().contains("10.96.0.2"));
    }

    #[test]
    fn a_file_that_parses_again_sends_what_differs_from_its_last_good_version() {
        let mut h = Harness::new(&[("a.yaml", &services(40, None))]);
        h.step();
        let half = format!(
            "{}---\nkind: [",
            services(40, None).replace("10.96.1.3,", "10.96.9.3,")
        );
        h.write("a.yaml", &half);
        assert_eq!(h.step(), Vec::<String>::new());
        assert!(h.service("s2").unwrap().contains("10.96.1.3"));
        h.write(
            "a.yaml",
            &services(40, None).replace("10.96.1.5,", "10.96.9.5,"),
        );
        assert_eq!(h.step(), ["upsert demo/s4"]);
        assert!(h.service("s4").unwrap().contains("10.96.9.5"));
    }

    #[tokio::test]
    async fn each_pass_that_sends_anything_frames_it_as_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), services(3, None)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let path = dir.path().to_owned();
        let mut sent = tokio::task::spawn_blocking(move || {
            let mut sent = None;
            assert!(send_changes(&path, &tx, &mut sent).unwrap());
            std::fs::write(path.join("a.yaml"), services(2, None)).unwrap();
            assert!(send_changes(&path, &tx, &mut sent).unwrap());
            // Nothing changed: nothing sent, not even an empty batch.
            assert!(send_changes(&path, &tx, &mut sent).unwrap());
            sent
        });
        let mut got = Vec::new();
        while let Some(u) = rx.recv().await {
            got.push(match u {
                SourceUpdate::BatchStart => "[".to_owned(),
                SourceUpdate::BatchEnd => "]".to_owned(),
                u => short(&u),
            });
        }
        got.retain(|w| !w.is_empty());
        assert!((&mut sent).await.unwrap().is_some());
        assert_eq!(
            got,
            [
                "[",
                "start",
                "item demo/s0",
                "item demo/s1",
                "item demo/s2",
                "done",
                "]",
                "[",
                "delete demo/s2",
                "]"
            ]
        );
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
