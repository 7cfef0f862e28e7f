//! A manifest file's text cut into its YAML documents, and pieces of work mapped over
//! worker threads with their results handed back in order.
//!
//! In YAML 1.2 a line that starts at column 0 with `---` followed by a space, a tab or the
//! line's end always begins a new document: no scalar may contain such a line. Cutting the
//! text before each of those lines therefore gives pieces that parse, one by one, to the
//! same documents as the whole stream (a piece that holds only comments or blank lines
//! parses to none). Text with a directive line (`%` at column 0) is left whole, since a
//! directive belongs to the document after the next marker.
//!
//! The pieces let a changed file be read again without parsing the documents that did not
//! change (their text, and so their digest, is the same), and let the documents of one
//! large file be parsed on every core.

use std::hash::{Hash, Hasher};

/// One piece of a file's text: a document with its `---` line, or the text before the
/// first marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece<'a> {
    /// The text, with its line ends.
    pub text: &'a str,
    /// The 0-based line of the file it starts on.
    pub line: usize,
}

/// Whether `line` (without its line end) is a document start marker.
fn is_marker(line: &str) -> bool {
    match line.strip_prefix("---") {
        Some(rest) => rest.is_empty() || rest.starts_with([' ', '\t', '\r']),
        None => false,
    }
}

/// Cuts `text` before every document start marker. The pieces, joined, are `text` but
/// for blank lines and comments before the first marker; an empty text gives no piece,
/// text with a directive one piece.
pub fn split(text: &str) -> Vec<Piece<'_>> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut pieces = Vec::new();
    let (mut start, mut start_line) = (0usize, 0usize);
    let mut offset = 0usize;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches('\n');
        if bare.starts_with('%') {
            return vec![Piece { text, line: 0 }];
        }
        if is_marker(bare) && offset > start {
            pieces.push(Piece {
                text: &text[start..offset],
                line: start_line,
            });
            (start, start_line) = (offset, n);
        }
        offset += line.len();
    }
    pieces.push(Piece {
        text: &text[start..],
        line: start_line,
    });
    // Blank lines and comments before the first marker are no document of the stream
    // (alone, they would parse to an empty one).
    if pieces.len() > 1 && pieces[0].text.lines().all(is_blank_or_comment) {
        pieces.remove(0);
    }
    pieces
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// A digest of a piece's (or a file's) bytes: equal texts have equal digests.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Results each worker may have ready ahead of the one being handed over.
const AHEAD: usize = 16;

/// The worker threads worth starting for `items` pieces of work: every core, up to 4,
/// and one (the calling thread) for fewer than 32 pieces.
pub fn workers_for(items: usize) -> usize {
    if items < 32 {
        return 1;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4)
}

/// Applies `f` to every item on `workers` threads (1: on this thread) and hands each
/// result to `sink` with its item's index, in the items' order, as soon as it and those
/// before it are done. Stops early when `sink` returns false. At most a few results per
/// worker wait to be handed over, so memory stays bounded whatever the number of items.
pub fn ordered_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> R + Sync,
    mut sink: impl FnMut(usize, R) -> bool,
) {
    let workers = workers.clamp(1, items.len().max(1));
    if workers == 1 {
        for (i, item) in items.iter().enumerate() {
            if !sink(i, f(item)) {
                return;
            }
        }
        return;
    }
    std::thread::scope(|scope| {
        let f = &f;
        let receivers: Vec<_> = (0..workers)
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::sync_channel(AHEAD);
                scope.spawn(move || {
                    for item in items.iter().skip(w).step_by(workers) {
                        if tx.send(f(item)).is_err() {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        for i in 0..items.len() {
            // A worker that panicked closes its channel; the scope re-raises the panic.
            let Ok(r) = receivers[i % workers].recv() else {
                return;
            };
            if !sink(i, r) {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_yaml_ng::Value;

    /// Every document of `text` parsed as one stream, as (value or error) strings.
    fn whole(text: &str) -> Vec<Result<Value, ()>> {
        let mut out = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            match Value::deserialize(doc) {
                Ok(v) => out.push(Ok(v)),
                Err(_) => {
                    out.push(Err(()));
                    break;
                }
            }
        }
        out
    }

    /// The documents of every piece of `text`, in order, up to the first error.
    fn pieces(text: &str) -> Vec<Result<Value, ()>> {
        let mut out = Vec::new();
        for p in split(text) {
            let docs = whole(p.text);
            let broken = docs.last().is_some_and(|d| d.is_err());
            out.extend(docs);
            if broken {
                break;
            }
        }
        out
    }

    #[test]
    fn pieces_parse_to_the_documents_of_the_whole_stream() {
        let texts = [
            "\n",
            "# only a comment\n",
            "a: 1\n",
            "---\na: 1\n",
            "# head\n---\na: 1\n---\nb: 2\n",
            "a: 1\n---\n---\nb: 2\n",
            "a: 1\n--- \nb: 2\n---\t# c\nc: 3",
            "a: 1\r\n---\r\nb: 2\r\n",
            "a: |\n  ---\n  text\n---\nb: 2\n",
            "a: 1\n...\n---\nb: 2\n",
            "a: 1\n...\nb: 2\n",
            "--- |\n  block\n--- {x: 1}\n",
            "----\n---a\n",
            "a: [1,\n---\nb: 2\n",
            "%YAML 1.2\n---\na: 1\n---\nb: 2\n",
            "a: 1\n---\nkey: [unclosed\n---\nc: 3\n",
            "\n# c\n---\na: 1\n",
            "~\n---\na: 1\n",
        ];
        for text in texts {
            assert_eq!(pieces(text), whole(text), "{text:?}");
        }
    }

    #[test]
    fn split_cuts_before_each_marker_keeping_the_documents_and_their_lines() {
        let text = "# head\n---\na: 1\n--- # two\nb: 2\n  ---\n---\n";
        let p = split(text);
        let texts: Vec<&str> = p.iter().map(|p| p.text).collect();
        assert_eq!(texts, ["---\na: 1\n", "--- # two\nb: 2\n  ---\n", "---\n"]);
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert_eq!(lines, [1, 3, 6]);
        assert_eq!(texts.concat(), &text["# head\n".len()..]);
        let texts: Vec<&str> = split("a: 1\n---\nb: 2").iter().map(|p| p.text).collect();
        assert_eq!(texts, ["a: 1\n", "---\nb: 2"]);
        assert_eq!(split("%YAML 1.2\n---\na: 1\n").len(), 1);
        assert!(split("").is_empty());
        assert_eq!(split("---\n---\n").len(), 2);
    }

    #[test]
    fn ordered_map_hands_results_over_in_order_and_stops_when_asked() {
        let items: Vec<u64> = (0..1000).collect();
        for workers in [1, 2, 3, 8] {
            let mut got = Vec::new();
            ordered_map(
                &items,
                workers,
                |x| x * 2,
                |i, r| {
                    got.push((i, r));
                    true
                },
            );
            let want: Vec<(usize, u64)> = (0..1000).map(|i| (i, i as u64 * 2)).collect();
            assert_eq!(got, want, "{workers} workers");
            let mut seen = 0;
            ordered_map(
                &items,
                workers,
                |x| *x,
                |i, _| {
                    seen += 1;
                    i < 9
                },
            );
            assert_eq!(seen, 10, "{workers} workers");
        }
    }
}
