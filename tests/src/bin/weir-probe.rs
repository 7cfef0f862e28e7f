//! Test client, run inside a network namespace:
//! - `weir-probe tcp ADDR:PORT COUNT [--source-port N]`: COUNT HTTP GETs, one connection
//!   each (with `--source-port`, each bound to local port N with SO_REUSEADDR and closed
//!   with a RST, so every connection has the same 5-tuple and leaves no TIME_WAIT);
//! - `weir-probe udp ADDR:PORT COUNT [--source-port N]`: COUNT datagrams from one socket
//!   (bound to local port N, with SO_REUSEADDR, so successive probes are one UDP flow);
//! - `weir-probe udp-each ADDR:PORT COUNT`: COUNT datagrams, each from a new unconnected
//!   socket (`sendto`/`recvfrom`); a reply whose source is not ADDR:PORT counts as error
//!   `wrong_source`;
//! - `weir-probe peername ADDR:PORT`: one TCP connection, prints `{"peername": ADDR:PORT}`
//!   as getpeername() reports it;
//! - `weir-probe hold ADDR:PORT MILLIS`: one TCP connection, a line every 100 ms;
//! - `weir-probe udp-hold ADDR:PORT MILLIS`: one connected UDP socket, a datagram every
//!   100 ms; prints a line per exchange as it happens (`answer NAME` or `error KIND`, 500 ms
//!   without a reply is `error timeout`); after any other error the socket is replaced by
//!   a new one connected to ADDR:PORT, as a resolver would;
//! - `weir-probe tcp-hold ADDR:PORT MILLIS`: the same over one TCP connection (a line and
//!   its echo every 100 ms), reconnecting after an error;
//! - `weir-probe get ADDR:PORT PATH`: one HTTP GET, prints the body;
//! - `weir-probe wait ADDR:PORT NAME|- TIMEOUT_MS`: a new TCP connection and one line every
//!   millisecond until the backend that answers is NAME (`-`: any backend); exits 0 then,
//!   printing `{"attempts": N}`, or 1 after TIMEOUT_MS (a benchmark's "traffic follows");
//! - `weir-probe http ADDR:PORT PATH`: one HTTP GET, prints
//!   `{"status": N, "headers": {lowercase name: value}, "body": "..."}`, or
//!   `{"error": KIND}` (refused, timeout, ...) when there is no answer;
//! - `weir-probe peer ADDR:PORT`: the source address the backend sees;
//! - `weir-probe matrix TIMEOUT_MS PROTO:ADDR:PORT...` (PROTO `tcp` or `udp`): probes every
//!   target at once, one thread each, and prints a JSON list in target order of
//!   `{"target": T, "ok": bool, "answer": NAME}` or `{"target": T, "ok": false, "error": KIND}`.
//!   TCP: connect and exchange one line; UDP: a datagram (resent every 250 ms) and its echo;
//!   nothing within the timeout is `timeout`;
//! - `weir-probe conntrack-delete --proto udp [--orig-dst IP] [--orig-dport P]
//!   [--reply-src IP] [--reply-sport PORT]` (test-only): deletes the matching conntrack entries of this network
//!   namespace through weir's ctnetlink code and prints `{"deleted": N}`.
//!
//! The other modes print one JSON object: answers per backend name, errors per kind,
//! latency percentiles.

use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);

fn kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        ErrorKind::ConnectionReset => "reset",
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
        ErrorKind::ConnectionAborted => "aborted",
        _ if e.raw_os_error() == Some(nix::errno::Errno::EDESTADDRREQ as i32) => "not_connected",
        _ => "other",
    }
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    get_body(s, path)
}

/// Sends `GET path` on a connected stream and answers the response's body.
fn get_body(mut s: TcpStream, path: &str) -> std::io::Result<String> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// One HTTP GET of `/` from local port `port` (SO_REUSEADDR), closed with a RST: the next
/// call uses the same 5-tuple. Answers the body.
fn http_get_from(addr: SocketAddr, port: u16) -> std::io::Result<String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let any: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::new(any, port).into())?;
    s.connect_timeout(&addr.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_linger(Some(Duration::ZERO))?;
    get_body(s.into(), "/")
}

/// One HTTP GET: the status, the headers (names lowercased) and the body.
fn http_exchange(
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let bad = |what: &str| std::io::Error::new(ErrorKind::InvalidData, format!("{what}: {out:?}"));
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

/// Removes `--NAME VALUE` from `args` and returns VALUE.
fn take_option(args: &mut Vec<String>, name: &str) -> anyhow::Result<Option<String>> {
    let Some(i) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    if i + 1 >= args.len() {
        anyhow::bail!("{name} needs a value");
    }
    let value = args.remove(i + 1);
    args.remove(i);
    Ok(Some(value))
}

/// A UDP socket connected to `addr`, bound to `source_port` (any when `None`).
fn udp_socket(addr: SocketAddr, source_port: Option<u16>) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let any: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // The previous probe's socket with this port may still be closing.
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::new(any, source_port.unwrap_or(0)).into())?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(addr)?;
    Ok(s)
}

/// `udp-hold` and `tcp-hold`: one socket, an exchange every 100 ms, a line per exchange.
fn hold_and_report(args: &[String]) -> anyhow::Result<()> {
    let udp = args[1] == "udp-hold";
    let addr: SocketAddr = args
        .get(2)
        .ok_or_else(|| anyhow::anyhow!("usage: weir-probe {} ADDR:PORT MILLIS", args[1]))?
        .parse()?;
    let millis: u64 = args.get(3).map(|c| c.parse()).transpose()?.unwrap_or(1000);
    let wait = Duration::from_millis(500);
    enum Conn {
        Udp(UdpSocket),
        Tcp(BufReader<TcpStream>),
    }
    let connect = || -> std::io::Result<Conn> {
        if udp {
            let s = udp_socket(addr, None)?;
            s.set_read_timeout(Some(wait))?;
            Ok(Conn::Udp(s))
        } else {
            let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            s.set_read_timeout(Some(wait))?;
            Ok(Conn::Tcp(BufReader::new(s)))
        }
    };
    let exchange = |c: &mut Conn| -> std::io::Result<String> {
        match c {
            Conn::Udp(s) => {
                s.send(b"hi")?;
                let mut buf = [0u8; 256];
                let n = s.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
            }
            Conn::Tcp(r) => {
                writeln!(r.get_mut(), "ping")?;
                let mut line = String::new();
                match r.read_line(&mut line)? {
                    0 => Err(std::io::Error::from(ErrorKind::ConnectionAborted)),
                    _ => Ok(line.trim().to_owned()),
                }
            }
        }
    };
    let end = Instant::now() + Duration::from_millis(millis);
    let mut conn = connect();
    let mut out = std::io::stdout();
    while Instant::now() < end {
        let line = match conn
            .as_mut()
            .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
        {
            Ok(c) => match exchange(c) {
                Ok(name) => format!("answer {name}"),
                Err(e) => {
                    let k = kind(&e);
                    if k != "timeout" {
                        conn = connect();
                    }
                    format!("error {k}")
                }
            },
            Err(e) => {
                let k = kind(&e);
                conn = connect();
                format!("error {k}")
            }
        };
        writeln!(out, "{line}")?;
        out.flush()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `conntrack-delete`: one filter from the flags, deleted in this network namespace.
fn conntrack_delete(mut args: Vec<String>) -> anyhow::Result<()> {
    use weir_proxy::dataplane::conntrack::{Conntrack, FlowFilter};
    use weir_proxy::model::Protocol;
    let proto = take_option(&mut args, "--proto")?.unwrap_or_else(|| "udp".into());
    let filter = FlowFilter {
        protocol: Protocol::from_nft_name(&proto)
            .ok_or_else(|| anyhow::anyhow!("unknown protocol {proto:?}"))?,
        orig_dst: take_option(&mut args, "--orig-dst")?
            .map(|v| v.parse())
            .transpose()?,
        orig_dport: take_option(&mut args, "--orig-dport")?
            .map(|v| v.parse())
            .transpose()?,
        reply_src: take_option(&mut args, "--reply-src")?
            .map(|v| v.parse())
            .transpose()?,
        reply_sport: take_option(&mut args, "--reply-sport")?
            .map(|v| v.parse())
            .transpose()?,
    };
    if args.len() > 2 {
        anyhow::bail!("unexpected arguments {:?}", &args[2..]);
    }
    let deleted = Conntrack::open()?.delete_matching(&[filter])?;
    println!("{}", json!({ "deleted": deleted }));
    Ok(())
}

/// One `matrix` probe: TCP connect plus a line exchange, or a UDP request and its echo,
/// all within `timeout`. Answers the name the server replied with.
fn probe_once(udp: bool, addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::from(ErrorKind::TimedOut))
    };
    if udp {
        let s = udp_socket(addr, None)?;
        let mut buf = [0u8; 256];
        loop {
            s.send(b"hi")?;
            s.set_read_timeout(Some(left()?.min(Duration::from_millis(250))))?;
            match s.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    left()?;
                }
                Err(e) => return Err(e),
            }
        }
    }
    let s = TcpStream::connect_timeout(&addr, left()?)?;
    s.set_read_timeout(Some(left()?))?;
    let mut w = s.try_clone()?;
    writeln!(w, "hi")?;
    let mut line = String::new();
    if BufReader::new(s).read_line(&mut line)? == 0 {
        return Err(ErrorKind::ConnectionReset.into());
    }
    Ok(line.trim().to_owned())
}

/// `matrix TIMEOUT_MS TARGET...`: every target probed concurrently.
fn matrix(args: &[String]) -> anyhow::Result<()> {
    let millis: u64 = args
        .get(2)
        .ok_or_else(|| anyhow::anyhow!("usage: weir-probe matrix TIMEOUT_MS PROTO:ADDR:PORT..."))?
        .parse()?;
    let timeout = Duration::from_millis(millis);
    let mut targets = Vec::new();
    for t in &args[3..] {
        let (proto, addr) = t
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("target {t:?} is not PROTO:ADDR:PORT"))?;
        let udp = match proto {
            "tcp" => false,
            "udp" => true,
            other => anyhow::bail!("unknown protocol {other:?} in {t:?}"),
        };
        targets.push((t.clone(), udp, addr.parse::<SocketAddr>()?));
    }
    let results: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(t, udp, addr)| {
                scope.spawn(move || match probe_once(*udp, *addr, timeout) {
                    Ok(answer) => json!({"target": t, "ok": true, "answer": answer}),
                    Err(e) => json!({"target": t, "ok": false, "error": kind(&e)}),
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| json!({"ok": false, "error": "panic"}))
            })
            .collect()
    });
    println!("{}", serde_json::Value::Array(results));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("conntrack-delete") {
        return conntrack_delete(args);
    }
    if args.get(1).map(String::as_str) == Some("matrix") {
        return matrix(&args);
    }
    if matches!(
        args.get(1).map(String::as_str),
        Some("udp-hold" | "tcp-hold")
    ) {
        return hold_and_report(&args);
    }
    let source_port: Option<u16> = take_option(&mut args, "--source-port")?
        .map(|p| p.parse())
        .transpose()?;
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    if source_port.is_some() && mode != "udp" && mode != "tcp" {
        anyhow::bail!("--source-port is for tcp and udp");
    }
    let addr: SocketAddr = args.get(2).map(|a| a.parse()).transpose()?.ok_or_else(|| {
        anyhow::anyhow!("usage: weir-probe tcp|udp|hold|get|http|peer ADDR:PORT N")
    })?;
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
    let mut lat: Vec<u128> = Vec::new();
    match mode {
        "wait" => return wait_for_backend(addr, &args),
        "peer" => {
            let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            writeln!(s, "peer")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            println!("{}", json!({"peer": line.trim()}));
            return Ok(());
        }
        "get" => {
            print!(
                "{}",
                http_get(addr, args.get(3).map(String::as_str).unwrap_or("/"))?
            );
            return Ok(());
        }
        "http" => {
            let path = args.get(3).map(String::as_str).unwrap_or("/");
            let report = match http_exchange(addr, path) {
                Ok((status, headers, body)) => {
                    json!({"status": status, "headers": headers, "body": body})
                }
                Err(e) => json!({"error": kind(&e)}),
            };
            println!("{report}");
            return Ok(());
        }
        "peername" => {
            let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            println!("{}", json!({"peername": s.peer_addr()?.to_string()}));
            return Ok(());
        }
        "udp-each" => {
            let count: u32 = args.get(3).map(|c| c.parse()).transpose()?.unwrap_or(1);
            for _ in 0..count {
                let t = Instant::now();
                let any: SocketAddr = if addr.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let r = UdpSocket::bind(any).and_then(|s| {
                    s.set_read_timeout(Some(TIMEOUT))?;
                    s.send_to(b"hi", addr)?;
                    let mut buf = [0u8; 256];
                    let (n, from) = s.recv_from(&mut buf)?;
                    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
                });
                match r {
                    Ok((_, from)) if from != addr => {
                        *errors.entry("wrong_source").or_default() += 1
                    }
                    Ok((name, _)) => {
                        lat.push(t.elapsed().as_micros());
                        *answers.entry(name.trim().to_owned()).or_default() += 1;
                    }
                    Err(e) => *errors.entry(kind(&e)).or_default() += 1,
                }
            }
        }
        "tcp" | "udp" => {
            let count: u32 = args.get(3).map(|c| c.parse()).transpose()?.unwrap_or(1);
            let udp = if mode == "udp" {
                Some(udp_socket(addr, source_port)?)
            } else {
                None
            };
            for _ in 0..count {
                let t = Instant::now();
                let r = match &udp {
                    Some(s) => s.send(b"hi").and_then(|_| {
                        let mut buf = [0u8; 256];
                        let n = s.recv(&mut buf)?;
                        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
                    }),
                    None => match source_port {
                        Some(port) => http_get_from(addr, port),
                        None => http_get(addr, "/"),
                    },
                };
                match r {
                    Ok(name) => {
                        lat.push(t.elapsed().as_micros());
                        *answers.entry(name.trim().to_owned()).or_default() += 1;
                    }
                    Err(e) => *errors.entry(kind(&e)).or_default() += 1,
                }
            }
        }
        "hold" => {
            let millis: u64 = args.get(3).map(|c| c.parse()).transpose()?.unwrap_or(1000);
            let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let mut w = s.try_clone()?;
            let mut r = BufReader::new(s);
            let end = Instant::now() + Duration::from_millis(millis);
            println!("connected");
            while Instant::now() < end {
                let mut line = String::new();
                let res = writeln!(w, "ping").and_then(|_| r.read_line(&mut line));
                match res {
                    Ok(n) if n > 0 => *answers.entry(line.trim().to_owned()).or_default() += 1,
                    Ok(_) => *errors.entry("closed").or_default() += 1,
                    Err(e) => *errors.entry(kind(&e)).or_default() += 1,
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        other => anyhow::bail!("unknown mode {other:?}"),
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{}",
        json!({"answers": answers, "errors": errors, "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99)})
    );
    Ok(())
}

/// `wait ADDR:PORT NAME|- TIMEOUT_MS`: connects again and again (one line each) until NAME,
/// or any backend, answers.
fn wait_for_backend(addr: SocketAddr, args: &[String]) -> anyhow::Result<()> {
    let want = args.get(3).map(String::as_str).unwrap_or("-");
    let timeout: u64 = args
        .get(4)
        .map(|t| t.parse())
        .transpose()?
        .unwrap_or(10_000);
    let deadline = Instant::now() + Duration::from_millis(timeout);
    let mut attempts = 0u64;
    while Instant::now() < deadline {
        attempts += 1;
        let answer = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut w = s.try_clone()?;
            writeln!(w, "who")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim().to_owned())
        });
        if let Ok(name) = answer {
            if want == "-" || name == want {
                println!("{}", json!({"attempts": attempts}));
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    anyhow::bail!("{addr}: no answer from {want} within {timeout} ms ({attempts} attempts)")
}
