//! Test backend: answers HTTP GETs and TCP lines with its name (the line `peer` with the
//! caller's address as this backend sees it), and UDP datagrams too.
//! `weir-echo NAME TCP_PORTS [UDP_PORTS]`, each a port or a comma-separated list
//! (`80,81`); prints `ready` once listening on all of them, on 0.0.0.0 and, where the
//! namespace has IPv6, on [::] (IPv6 only, so IPv4 callers keep plain addresses).

use socket2::{Domain, Protocol, Socket, Type};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};

/// A socket bound to `addr`; an IPv6 one takes IPv6 only.
fn bound(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if ty == Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

fn serve_udp(sock: UdpSocket, name: String) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(name.as_bytes(), from);
        }
    });
}

fn serve_tcp(listener: TcpListener, name: String) {
    std::thread::spawn(move || accept(listener, name));
}

/// `80` or `80,81`.
fn ports(arg: &str) -> anyhow::Result<Vec<u16>> {
    arg.split(',')
        .map(|p| p.trim().parse().map_err(anyhow::Error::from))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).cloned().unwrap_or_else(|| "echo".into());
    let tcp = match args.get(2) {
        Some(a) => ports(a)?,
        None => vec![8080],
    };
    let udp = args
        .get(3)
        .map(|a| ports(a))
        .transpose()?
        .unwrap_or_default();
    let any4 = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let any6 = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    for &port in &tcp {
        let tcp4 = bound(any4(port), Type::STREAM, Protocol::TCP)?;
        tcp4.listen(128)?;
        serve_tcp(tcp4.into(), name.clone());
        // IPv6 is optional: a namespace without it serves IPv4 alone.
        match bound(any6(port), Type::STREAM, Protocol::TCP).and_then(|s| s.listen(128).map(|_| s))
        {
            Ok(s) => serve_tcp(s.into(), name.clone()),
            Err(e) => eprintln!("weir-echo: no IPv6 TCP listener on {port}: {e}"),
        }
    }
    for &port in &udp {
        serve_udp(
            bound(any4(port), Type::DGRAM, Protocol::UDP)?.into(),
            name.clone(),
        );
        match bound(any6(port), Type::DGRAM, Protocol::UDP) {
            Ok(s) => serve_udp(s.into(), name.clone()),
            Err(e) => eprintln!("weir-echo: no IPv6 UDP socket on {port}: {e}"),
        }
    }
    println!("ready");
    // The listeners serve on their threads until the process is killed.
    loop {
        std::thread::park();
    }
}

fn accept(listener: TcpListener, name: String) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let n = name.clone();
        std::thread::spawn(move || {
            let Ok(read) = conn.try_clone() else { return };
            let mut lines = BufReader::new(read);
            let mut line = String::new();
            while lines.read_line(&mut line).is_ok_and(|r| r > 0) {
                if line.starts_with("GET ") {
                    // Drain headers, answer once, close.
                    let mut h = String::new();
                    while lines.read_line(&mut h).is_ok_and(|r| r > 2) {
                        h.clear();
                    }
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{n}",
                        n.len()
                    );
                    return;
                }
                // `peer` asks who is calling: the source address this backend sees.
                let reply = match (line.trim(), conn.peer_addr()) {
                    ("peer", Ok(peer)) => peer.ip().to_string(),
                    _ => n.clone(),
                };
                if writeln!(conn, "{reply}").is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
}
