//! The netlink socket the kernel-talking backends share: ctnetlink (conntrack), generic
//! netlink (IPVS) and sock_diag (eBPF mode's stale sockets). It opens and connects the
//! socket, numbers requests, frames messages into one datagram on the kernel's 4-byte
//! boundaries, sends whole datagrams and receives one datagram at a time, refusing a
//! truncated one. What the replies mean stays with each protocol's module.

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLMSG_ALIGNTO,
};
use netlink_sys::{Socket, SocketAddr};
use std::io;
use std::path::Path;

/// Failures of the socket itself.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened, bound or connected.
    #[error("opening the netlink socket: {0}")]
    Open(#[source] io::Error),
    /// `send` or `recv` failed, or sent less than the datagram.
    #[error("netlink {op}: {source}")]
    Socket {
        /// `send` or `recv`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A reply did not fit the buffer, or its framing is broken.
    #[error("malformed netlink reply: {0}")]
    Decode(String),
}

/// A netlink socket connected to the kernel.
pub struct NetlinkSocket {
    socket: Socket,
    seq: u32,
    rx: Vec<u8>,
}

impl std::fmt::Debug for NetlinkSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkSocket")
            .field("seq", &self.seq)
            .finish()
    }
}

impl NetlinkSocket {
    /// Opens a socket of `protocol` (`NETLINK_NETFILTER`, ...) talking to the kernel,
    /// receiving datagrams of up to `rx_buffer` bytes.
    pub fn open(protocol: isize, rx_buffer: usize) -> Result<NetlinkSocket, NetlinkError> {
        let mut socket = Socket::new(protocol).map_err(NetlinkError::Open)?;
        socket.bind_auto().map_err(NetlinkError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Open)?;
        Ok(NetlinkSocket {
            socket,
            seq: 0,
            rx: Vec::with_capacity(rx_buffer),
        })
    }

    /// Asks for acknowledgements without a copy of the request (`NETLINK_CAP_ACK`):
    /// smaller replies; optional, so a kernel without it is only logged.
    pub fn cap_ack(&mut self) {
        if let Err(e) = self.socket.set_cap_ack(true) {
            tracing::debug!(error = %e, "NETLINK_CAP_ACK unavailable");
        }
    }

    /// The next request's sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Appends a request with the next sequence number and `flags` to the datagram in
    /// `out`; returns its sequence number.
    pub fn append<T>(&mut self, out: &mut Vec<u8>, flags: u16, payload: NetlinkPayload<T>) -> u32
    where
        T: NetlinkSerializable + std::fmt::Debug,
    {
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        frame(out, NetlinkMessage::new(header, payload));
        seq
    }

    /// Sends one datagram, all of it.
    pub fn send(&self, buf: &[u8]) -> Result<(), NetlinkError> {
        let sent = self
            .socket
            .send(buf, 0)
            .map_err(|source| NetlinkError::Socket { op: "send", source })?;
        if sent != buf.len() {
            return Err(NetlinkError::Socket {
                op: "send",
                source: io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("sent {sent} of {} bytes", buf.len()),
                ),
            });
        }
        Ok(())
    }

    /// Receives one datagram (retrying after a signal); a datagram larger than the
    /// buffer is an error rather than a silent truncation.
    pub fn recv(&mut self) -> Result<&[u8], NetlinkError> {
        loop {
            self.rx.clear();
            match self.socket.recv(&mut self.rx, libc::MSG_TRUNC) {
                Ok(n) if n > self.rx.len() => {
                    return Err(NetlinkError::Decode(format!(
                        "a datagram of {n} bytes did not fit the {}-byte receive buffer",
                        self.rx.capacity()
                    )))
                }
                Ok(_) => return Ok(&self.rx),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(NetlinkError::Socket { op: "recv", source }),
            }
        }
    }
}

/// Runs `f` on a new thread that has entered the network namespace at `path`, so a
/// socket `f` opens talks to that namespace's kernel state; the caller's thread stays
/// where it is. The error is for entering the namespace (or `f` panicking), not `f`'s own.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the worker thread panicked")))
    })
}

/// Appends `msg` (finalized here) to the datagram in `out`, on the 4-byte boundary the
/// kernel expects between messages.
pub fn frame<T>(out: &mut Vec<u8>, mut msg: NetlinkMessage<T>)
where
    T: NetlinkSerializable + std::fmt::Debug,
{
    msg.finalize();
    let align = usize::from(NLMSG_ALIGNTO);
    let start = out.len().div_ceil(align) * align;
    out.resize(start + msg.buffer_len(), 0);
    msg.serialize(&mut out[start..]);
}

/// Splits a received datagram into its netlink messages.
pub fn messages(buf: &[u8]) -> Result<Vec<&[u8]>, NetlinkError> {
    let mut out = Vec::new();
    let mut offset = 0;
    let align = usize::from(NLMSG_ALIGNTO);
    while offset < buf.len() {
        let rest = &buf[offset..];
        let len = NetlinkBuffer::new_checked(rest)
            .map_err(|e| NetlinkError::Decode(format!("at offset {offset}: {e}")))?
            .length() as usize;
        if len == 0 {
            return Err(NetlinkError::Decode(format!(
                "a zero-length message at offset {offset}"
            )));
        }
        out.push(&rest[..len]);
        offset += len.div_ceil(align) * align;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DoneMessage, NLM_F_REQUEST};

    fn done(seq: u32) -> NetlinkMessage<netlink_packet_netfilter::NetfilterMessage> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = NLM_F_REQUEST;
        NetlinkMessage::new(header, NetlinkPayload::Done(DoneMessage::default()))
    }

    #[test]
    fn framed_messages_split_back_on_aligned_boundaries() {
        let mut buf = Vec::new();
        frame(&mut buf, done(1));
        frame(&mut buf, done(2));
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        for (m, seq) in msgs.iter().zip([1, 2]) {
            let header = NetlinkBuffer::new_checked(*m).unwrap();
            assert_eq!(header.sequence_number(), seq);
            assert_eq!(m.len() % 4, 0);
        }
    }

    #[test]
    fn a_message_longer_than_the_datagram_is_refused() {
        let mut buf = Vec::new();
        frame(&mut buf, done(1));
        buf.truncate(buf.len() - 2);
        assert!(matches!(messages(&buf), Err(NetlinkError::Decode(_))));
        assert!(matches!(messages(&[0u8; 16]), Err(NetlinkError::Decode(_))));
    }
}
