//! Test backend: answers HTTP GETs and TCP lines with its name (the line `peer` with the
//! caller's address as this backend sees it), and UDP datagrams too.
//! `weir-echo NAME TCP_PORT [UDP_PORT]`; prints `ready` once listening.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).cloned().unwrap_or_else(|| "echo".into());
    let tcp: u16 = args.get(2).map(|p| p.parse()).transpose()?.unwrap_or(8080);
    let udp: Option<u16> = args.get(3).map(|p| p.parse()).transpose()?;
    let listener = TcpListener::bind(("0.0.0.0", tcp))?;
    if let Some(port) = udp {
        let sock = UdpSocket::bind(("0.0.0.0", port))?;
        let n = name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(n.as_bytes(), from);
            }
        });
    }
    println!("ready");
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
    Ok(())
}
