//! What a Prometheus text exposition (`/metrics`) declares: each family's type and the
//! label names its samples carry, for comparing weir's metrics with kube-proxy's.

use std::collections::{BTreeMap, BTreeSet};

/// One metric family of an exposition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub kind: String,
    /// Label names of its samples (a histogram's `le` and a summary's `quantile` left out).
    pub labels: BTreeSet<String>,
    /// Whether any sample of it appeared.
    pub has_samples: bool,
}

/// The families of `text` by name as declared in `# TYPE`, a counter's without `_total`:
/// Go's client (kube-proxy) declares `# TYPE x_total counter`, OpenMetrics text (weir's
/// prometheus-client) `# TYPE x counter`, and both expose the sample `x_total`.
pub fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (w.next(), w.next()) {
                let name = match kind {
                    "counter" => name.strip_suffix("_total").unwrap_or(name),
                    _ => name,
                };
                out.entry(name.to_owned()).or_default().kind = kind.to_owned();
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels) = sample_name_and_labels(line);
        let family = family_of(&out, name);
        let f = out.entry(family).or_insert_with(|| Family {
            kind: "untyped".to_owned(),
            ..Family::default()
        });
        f.has_samples = true;
        for l in labels {
            if l != "le" && l != "quantile" {
                f.labels.insert(l);
            }
        }
    }
    out
}

/// The family a sample name belongs to: itself, or without a histogram's, summary's or
/// counter's suffix when that family was declared.
fn family_of(known: &BTreeMap<String, Family>, name: &str) -> String {
    for suffix in ["_bucket", "_sum", "_count", "_total", "_created"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if known.contains_key(base) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

/// A sample line's metric name and label names (`name{a="x",b="y, z"} 1`).
fn sample_name_and_labels(line: &str) -> (&str, Vec<String>) {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..end];
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let mut in_value = false;
        let mut escaped = false;
        let mut current = String::new();
        for c in line[end + 1..].chars() {
            if in_value {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_value = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_value = true,
                '=' => labels.push(std::mem::take(&mut current).trim().to_owned()),
                ',' | ' ' => {}
                '}' => break,
                c => current.push(c),
            }
        }
    }
    (name, labels)
}

/// The p-quantile of a Prometheus histogram in the text exposition `text` (its IPv4 series
/// when it has one per family), as the upper bound of the bucket it falls in, with the
/// series' count.
pub fn histogram_quantile(text: &str, name: &str, p: f64) -> Option<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        // `name_bucket{le="0.25",ip_family="IPv4"} 3`: the IPv4 series (weir observes every
        // sync once per family; the labels come in either order).
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) else {
            continue;
        };
        let (labels, count) = rest.split_once("} ")?;
        // A series per family (weir's) or one for both (kube-proxy's).
        let family = labels.split(',').find(|l| l.starts_with("ip_family="));
        if family.is_some_and(|l| l != "ip_family=\"IPv4\"") {
            continue;
        }
        let le = labels
            .split(',')
            .find_map(|l| l.strip_prefix("le=\""))?
            .strip_suffix('"')?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count.trim().parse().ok()?));
    }
    let total = buckets.last()?.1;
    let want = total * p;
    let le = buckets.iter().find(|(_, c)| *c >= want)?.0;
    Some((le, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_read_the_ipv4_series_or_the_only_one() {
        let weir = "x_bucket{ip_family=\"IPv6\",le=\"0.1\"} 9\nx_bucket{ip_family=\"IPv4\",le=\"0.1\"} 1\nx_bucket{ip_family=\"IPv4\",le=\"1\"} 4\nx_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 4\n";
        assert_eq!(histogram_quantile(weir, "x", 0.5), Some((1.0, 4.0)));
        assert_eq!(histogram_quantile(weir, "x", 0.25), Some((0.1, 4.0)));
        let kube_proxy =
            "x_bucket{le=\"0.25\"} 3\nx_bucket{le=\"0.5\"} 4\nx_bucket{le=\"+Inf\"} 4\n";
        assert_eq!(histogram_quantile(kube_proxy, "x", 0.5), Some((0.25, 4.0)));
        assert_eq!(histogram_quantile(kube_proxy, "x", 0.99), Some((0.5, 4.0)));
        assert_eq!(histogram_quantile("", "x", 0.5), None);
    }

    #[test]
    fn families_carry_their_type_and_label_names() {
        let text = "# HELP a_seconds x\n# TYPE a_seconds histogram\n\
            a_seconds_bucket{ip_family=\"IPv4\",le=\"0.1\"} 1\n\
            a_seconds_sum{ip_family=\"IPv4\"} 0.2\na_seconds_count{ip_family=\"IPv4\"} 1\n\
            # TYPE b counter\nb_total{code=\"200\",note=\"a, \\\"q\\\" b\"} 3\n\
            # TYPE c gauge\nc 1\n# TYPE d gauge\n# TYPE e_total counter\ne_total 2\n";
        let f = families(text);
        assert_eq!(f["a_seconds"].kind, "histogram");
        assert_eq!(
            f["a_seconds"].labels,
            BTreeSet::from(["ip_family".to_owned()])
        );
        assert_eq!(f["b"].kind, "counter");
        assert_eq!(
            f["b"].labels,
            BTreeSet::from(["code".to_owned(), "note".to_owned()])
        );
        assert!(f["c"].labels.is_empty() && f["c"].has_samples);
        assert!(!f["d"].has_samples);
        assert_eq!(f["e"].kind, "counter", "Go's counter declaration");
        assert!(f["e"].has_samples);
        assert_eq!(f.len(), 5);
    }
}
