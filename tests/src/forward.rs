//! A TCP forwarder from a port on a test namespace's loopback to one on the host's
//! loopback: the listening socket is created inside the namespace (by a thread that joined
//! it), connections to the target are made from the host's namespace. Lets a weir-proxy in a
//! node namespace reach the test API server, which listens on the host's 127.0.0.1.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

/// Forwards `127.0.0.1:port` in a namespace to `target` on the host until dropped.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    netns: String,
}

/// Binds `127.0.0.1:port` inside network namespace `netns` (a name under /var/run/netns).
fn bind_in(netns: &str, port: u16) -> io::Result<TcpListener> {
    let path = format!("/var/run/netns/{netns}");
    thread::spawn(move || -> io::Result<TcpListener> {
        let f = std::fs::File::open(&path)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        // This thread ends here; the socket stays in the namespace it was made in.
        TcpListener::bind(("127.0.0.1", port))
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl Forwarder {
    /// Starts forwarding `127.0.0.1:port` in `netns` to `target` (reached from the host).
    pub fn start(netns: &str, port: u16, target: SocketAddr) -> io::Result<Forwarder> {
        let listener = bind_in(netns, port)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(inside) = conn else { continue };
                // Threads spawned here are in the host namespace (this one never joined).
                let Ok(outside) = TcpStream::connect(target) else {
                    let _ = inside.shutdown(Shutdown::Both);
                    continue;
                };
                // Watch events are small writes: sent at once, not held for an ACK.
                let _ = inside.set_nodelay(true);
                let _ = outside.set_nodelay(true);
                let (a, b) = match (inside.try_clone(), outside.try_clone()) {
                    (Ok(a), Ok(b)) => (a, b),
                    _ => continue,
                };
                thread::spawn(move || pump(inside, outside));
                thread::spawn(move || pump(b, a));
            }
        });
        Ok(Forwarder {
            stop,
            addr,
            netns: netns.to_owned(),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop with one last connection from inside the namespace.
        if let Ok(l) = thread::spawn({
            let path = format!("/var/run/netns/{}", self.netns);
            let addr = self.addr;
            move || -> io::Result<()> {
                let f = std::fs::File::open(&path)?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                TcpStream::connect(addr).map(drop)
            }
        })
        .join()
        {
            let _ = l;
        }
    }
}
