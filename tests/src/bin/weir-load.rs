//! Benchmark client for `cargo xtask bench compare`, run inside a network namespace:
//! `weir-load ADDR:PORT[,ADDR:PORT...] REQUESTS CONCURRENCY MILLIS` (several targets are used
//! in turn, one per connection: e.g. every backend pod addressed directly).
//!
//! 1. REQUESTS sequential HTTP GETs, one new TCP connection each: the time of the connect
//!    alone (SYN to established: the first packet's trip through the NAT rules) and of the
//!    whole connect + request + response + close;
//! 2. CONCURRENCY threads doing the same back to back for MILLIS milliseconds: requests
//!    per second.
//!
//! Prints one JSON object: `ok`, `errors`, `connect_p50_us`, `connect_p99_us`, `p50_us`,
//! `p99_us` (phase 1) and `rps` (phase 2).

use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);

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

fn pct(sorted: &[u128], p: f64) -> u128 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || anyhow::anyhow!("usage: weir-load ADDR:PORT[,...] REQUESTS CONCURRENCY MILLIS");
    let targets: Vec<SocketAddr> = args
        .get(1)
        .ok_or_else(usage)?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let next = AtomicU64::new(0);
    let addr = || targets[next.fetch_add(1, Ordering::Relaxed) as usize % targets.len()];
    let requests: usize = args.get(2).ok_or_else(usage)?.parse()?;
    let concurrency: usize = args.get(3).ok_or_else(usage)?.parse()?;
    let millis: u64 = args.get(4).ok_or_else(usage)?.parse()?;
    let mut connect = Vec::with_capacity(requests);
    let mut total = Vec::with_capacity(requests);
    let mut errors = 0u64;
    for _ in 0..requests {
        match request(addr()) {
            Ok((c, t)) => {
                connect.push(c.as_micros());
                total.push(t.as_micros());
            }
            Err(_) => errors += 1,
        }
    }
    connect.sort_unstable();
    total.sort_unstable();
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match request(addr()) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_millis(millis));
        stop.store(true, Ordering::Relaxed);
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "ok": total.len(),
            "errors": errors + failed.load(Ordering::Relaxed),
            "connect_p50_us": pct(&connect, 0.5),
            "connect_p99_us": pct(&connect, 0.99),
            "p50_us": pct(&total, 0.5),
            "p99_us": pct(&total, 0.99),
            "rps": done.load(Ordering::Relaxed) as f64 / secs,
        })
    );
    Ok(())
}
