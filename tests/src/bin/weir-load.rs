//! Benchmark client for `cargo xtask bench compare` and `bench datapath`, run inside a network
//! namespace: `weir-load GROUP[/GROUP...] REQUESTS CONCURRENCY MILLIS`, where a GROUP is
//! `ADDR:PORT[,ADDR:PORT...]` (several targets of one group are used in turn, one per
//! connection: e.g. every backend pod addressed directly).
//!
//! 1. A short warm-up (neighbour entries, conntrack, the echo servers' first threads), then
//!    REQUESTS sequential HTTP GETs per group, one new TCP connection each: the time of the
//!    connect alone (SYN to established: the first packet's trip through the NAT rules) and
//!    of the whole connect + request + response + close. With several groups the
//!    connections alternate between them (one to each group in turn), so a burst of load
//!    on the machine hits every group alike;
//! 2. CONCURRENCY threads doing the same back to back for MILLIS milliseconds per group:
//!    requests per second. With several groups the time is cut into slices that alternate
//!    between the groups.
//!
//! Prints one JSON object: `ok`, `errors`, `connect_p50_us`, `connect_p99_us`, `p50_us`,
//! `p99_us` (phase 1) and `rps` (phase 2); with several groups, `{"groups": [...]}` with
//! one such object per group, in the order given.

use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Unmeasured connections per group before the measured ones.
const WARM_UP: usize = 20;
/// Length of one throughput slice when several groups alternate.
const SLICE: Duration = Duration::from_millis(100);

/// One connection: (connect time, total time).
fn request(addr: SocketAddr) -> std::io::Result<(Duration, Duration)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    let connected = t.elapsed();
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(256);
    s.read_to_end(&mut buf)?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok((connected, t.elapsed()))
}

/// The value at quantile `p` of sorted samples (nearest rank).
fn pct(sorted: &[u128], p: f64) -> u128 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0)
}

/// Parses `A:P,B:Q/C:R` into groups of addresses.
fn groups(arg: &str) -> anyhow::Result<Vec<Vec<SocketAddr>>> {
    arg.split('/')
        .map(|g| {
            g.split(',')
                .map(|a| a.trim().parse().map_err(anyhow::Error::from))
                .collect()
        })
        .collect()
}

/// One group's targets, used in turn.
struct Group {
    targets: Vec<SocketAddr>,
    next: AtomicU64,
    connect: Vec<u128>,
    total: Vec<u128>,
    errors: u64,
    done: AtomicU64,
    failed: AtomicU64,
    busy: Duration,
}

impl Group {
    fn addr(&self) -> SocketAddr {
        self.targets[self.next.fetch_add(1, Ordering::Relaxed) as usize % self.targets.len()]
    }

    fn report(&self) -> serde_json::Value {
        let secs = self.busy.as_secs_f64();
        json!({
            "ok": self.total.len(),
            "errors": self.errors + self.failed.load(Ordering::Relaxed),
            "connect_p50_us": pct(&self.connect, 0.5),
            "connect_p99_us": pct(&self.connect, 0.99),
            "p50_us": pct(&self.total, 0.5),
            "p99_us": pct(&self.total, 0.99),
            "rps": if secs > 0.0 { self.done.load(Ordering::Relaxed) as f64 / secs } else { 0.0 },
        })
    }
}

/// CONCURRENCY threads against one group for `length`.
fn throughput(g: &Group, concurrency: usize, length: Duration) -> Duration {
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match request(g.addr()) {
                        Ok(_) => g.done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => g.failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(length);
        stop.store(true, Ordering::Relaxed);
    });
    started.elapsed()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || {
        anyhow::anyhow!(
            "usage: weir-load ADDR:PORT[,...][/ADDR:PORT[,...]...] REQUESTS CONCURRENCY MILLIS"
        )
    };
    let mut all: Vec<Group> = groups(args.get(1).ok_or_else(usage)?)?
        .into_iter()
        .map(|targets| Group {
            targets,
            next: AtomicU64::new(0),
            connect: Vec::new(),
            total: Vec::new(),
            errors: 0,
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            busy: Duration::ZERO,
        })
        .collect();
    let requests: usize = args.get(2).ok_or_else(usage)?.parse()?;
    let concurrency: usize = args.get(3).ok_or_else(usage)?.parse()?;
    let millis: u64 = args.get(4).ok_or_else(usage)?.parse()?;
    for _ in 0..WARM_UP {
        for g in &all {
            let _ = request(g.addr());
        }
    }
    for _ in 0..requests {
        for g in &mut all {
            match request(g.addr()) {
                Ok((c, t)) => {
                    g.connect.push(c.as_micros());
                    g.total.push(t.as_micros());
                }
                Err(_) => g.errors += 1,
            }
        }
    }
    for g in &mut all {
        g.connect.sort_unstable();
        g.total.sort_unstable();
    }
    let length = Duration::from_millis(millis);
    let slice = if all.len() > 1 { SLICE } else { length };
    while all.iter().any(|g| g.busy < length) {
        for g in &mut all {
            if g.busy < length {
                let d = throughput(g, concurrency, slice.min(length - g.busy));
                g.busy += d;
            }
        }
    }
    let reports: Vec<serde_json::Value> = all.iter().map(Group::report).collect();
    match reports.as_slice() {
        [one] => println!("{one}"),
        _ => println!("{}", json!({ "groups": reports })),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_split_on_slashes_and_targets_on_commas() {
        let g = groups("10.96.0.1:80/10.244.1.10:8080,10.244.1.11:8080").unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].len(), 1);
        assert_eq!(g[1][1], "10.244.1.11:8080".parse().unwrap());
        assert!(groups("10.96.0.1").is_err());
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<u128> = (1..=100).collect();
        assert_eq!(pct(&v, 0.5), 51);
        assert_eq!(pct(&v, 0.99), 99);
        assert_eq!(pct(&[], 0.5), 0);
    }
}
