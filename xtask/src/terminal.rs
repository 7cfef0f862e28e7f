//! What the demos and the tool installers print on the terminal: step headlines and the
//! table of which backend answered how many probe requests.

use serde_json::Value;

/// A step headline, bold, on stderr.
pub fn say(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

/// A weir-probe report (`answers` by backend name, latency percentiles, `errors`) as a
/// table of each of `names`' share of the answers.
pub fn share_table_for(title: &str, report: &Value, names: &[&str]) {
    let total: u64 = report["answers"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    println!("\n  {title}");
    println!("  {:<8} {:>8} {:>8}", "backend", "answers", "share");
    for &name in names {
        let n = report["answers"][name].as_u64().unwrap_or(0);
        let share = if total > 0 {
            100.0 * n as f64 / total as f64
        } else {
            0.0
        };
        println!("  {name:<8} {n:>8} {share:>7.1}%");
    }
    let errors = report["errors"].as_object().map(|m| m.len()).unwrap_or(0);
    println!(
        "  latency p50 {} µs, p90 {} µs, p99 {} µs; {} error kinds",
        report["p50_us"], report["p90_us"], report["p99_us"], errors
    );
}
