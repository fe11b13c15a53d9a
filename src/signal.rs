//! How a wake-up reaches the reader: a loopback datagram, or a readable
//! descriptor. Chosen when the instance starts; the wake protocol
//! (`wake.rs`) is the same for all of them, and decides *when* to signal.
//!
//! - [`Signal::Udp`]: a socket bound to 127.0.0.1 port 0 and connected to the
//!   reader's port. The reader connects back to it (`setpeername`), so the
//!   kernel drops anyone else's datagrams. The reader reads its socket.
//! - [`Signal::Greeting`]: for readers that cannot bind (OpenResty's UDP
//!   cosocket). The native socket is bound here; the reader greets it with
//!   a secret token, and the socket connects to the greeting's sender. Until
//!   then a wake-up cannot be sent, so the reader drains once after greeting.
//! - [`Signal::Fd`]: an eventfd (Linux) or a pipe. The reader waits for it
//!   to be readable; the core clears it itself at the empty poll, before the
//!   flag goes down, so no write after that is lost.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Datagrams one `accept_greeting` reads at most.
const GREETING_READS: usize = 64;

pub enum Signal {
    Udp(UdpSocket),
    Greeting { socket: UdpSocket, token: String },
    Fd(Descriptor),
}

/// The two ends of a descriptor signal: the same eventfd, or a pipe.
pub struct Descriptor {
    read: OwnedFd,
    write: Option<OwnedFd>,
}

/// Which descriptor [`Signal::fd`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    EventFd,
    Pipe,
}

impl FdKind {
    /// eventfd where the system has it, a pipe elsewhere.
    pub fn native() -> Self {
        if cfg!(target_os = "linux") {
            FdKind::EventFd
        } else {
            FdKind::Pipe
        }
    }
}

fn loopback_socket() -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    // A producer thread must never block on a wake-up.
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn random_token() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0) };
        filled += check(n as libc::c_int)? as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Signal {
    pub fn udp(port: u16) -> io::Result<Signal> {
        let socket = loopback_socket()?;
        socket.connect((Ipv4Addr::LOCALHOST, port))?;
        Ok(Signal::Udp(socket))
    }

    pub fn greeting() -> io::Result<Signal> {
        Ok(Signal::Greeting { socket: loopback_socket()?, token: random_token()? })
    }

    pub fn fd(kind: FdKind) -> io::Result<Signal> {
        // SAFETY: plain descriptor syscalls; each new descriptor is owned once.
        unsafe {
            let descriptor = match kind {
                #[cfg(target_os = "linux")]
                FdKind::EventFd => {
                    let fd = check(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?;
                    Descriptor { read: OwnedFd::from_raw_fd(fd), write: None }
                }
                #[cfg(not(target_os = "linux"))]
                FdKind::EventFd => return Err(io::Error::from(io::ErrorKind::Unsupported)),
                FdKind::Pipe => {
                    let mut fds = [0; 2];
                    check(libc::pipe(fds.as_mut_ptr()))?;
                    let (read, write) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
                    for fd in [fds[0], fds[1]] {
                        check(libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK))?;
                        check(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC))?;
                    }
                    Descriptor { read, write: Some(write) }
                }
            };
            Ok(Signal::Fd(descriptor))
        }
    }

    /// Producer side: make the reader's wait return.
    pub fn notify(&self) -> io::Result<()> {
        match self {
            Signal::Udp(socket) | Signal::Greeting { socket, .. } => socket.send(&[1]).map(drop),
            Signal::Fd(descriptor) => descriptor.notify(),
        }
    }

    /// Reader side, at the empty poll and before the flag goes down: consume
    /// the readiness that announced this drain. Datagrams are the reader's
    /// own to read, so only a descriptor has anything to clear here.
    pub fn clear(&self) {
        if let Signal::Fd(descriptor) = self {
            descriptor.clear();
        }
    }

    /// The descriptor the reader waits on, for [`Signal::Fd`].
    pub fn reader_fd(&self) -> Option<RawFd> {
        match self {
            Signal::Fd(descriptor) => Some(descriptor.read.as_raw_fd()),
            _ => None,
        }
    }

    /// Where datagrams come from (UDP), or where to greet (greeting).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Signal::Udp(socket) | Signal::Greeting { socket, .. } => socket.local_addr().ok(),
            Signal::Fd(_) => None,
        }
    }

    pub fn token(&self) -> Option<&str> {
        match self {
            Signal::Greeting { token, .. } => Some(token),
            _ => None,
        }
    }

    /// Greeting mode, reader side: read waiting greetings; connect to the
    /// sender of the first that carries the token and comes from loopback.
    /// Anything else is read and dropped, so junk never jams the port: a
    /// token that arrives after it is found by this call or a later one.
    /// At most `GREETING_READS` datagrams per call, so that a flood cannot
    /// hold the Lua thread here. `true` once connected.
    pub fn accept_greeting(&self) -> bool {
        let Signal::Greeting { socket, token } = self else {
            return false;
        };
        if socket.peer_addr().is_ok() {
            return true;
        }
        // Longer than any token, so a longer datagram never matches.
        let mut buf = [0u8; 64];
        for _ in 0..GREETING_READS {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return false;
            };
            if from.ip().is_loopback() && &buf[..n] == token.as_bytes() && socket.connect(from).is_ok() {
                return true;
            }
        }
        false
    }
}

impl Descriptor {
    fn notify(&self) -> io::Result<()> {
        let (fd, bytes): (RawFd, &[u8]) = match &self.write {
            // eventfd: add 1 to the counter.
            None => (self.read.as_raw_fd(), &1u64.to_ne_bytes()),
            Some(write) => (write.as_raw_fd(), &[1]),
        };
        // SAFETY: writes from our buffer to a descriptor we own.
        if unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) } >= 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            // A full pipe, or a saturated counter, is readable already.
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            e => Err(e),
        }
    }

    fn clear(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into our buffer from a non-blocking descriptor we own;
        // stops at EAGAIN (nothing left) or an error.
        while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pollfd, 1, 0) == 1 }
    }

    #[test]
    fn descriptors_become_readable_and_clear() {
        for kind in [FdKind::native(), FdKind::Pipe] {
            let signal = Signal::fd(kind).unwrap();
            let fd = signal.reader_fd().unwrap();
            assert!(!readable(fd), "{kind:?} starts quiet");
            signal.notify().unwrap();
            signal.notify().unwrap();
            assert!(readable(fd), "{kind:?} readable after notify");
            signal.clear();
            assert!(!readable(fd), "{kind:?} cleared by one clear");
        }
    }

    #[test]
    fn a_greeting_needs_the_token() {
        let signal = Signal::greeting().unwrap();
        let addr = signal.local_addr().unwrap();
        assert!(addr.ip().is_loopback());
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"not the token", addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(!signal.accept_greeting());
        assert!(signal.notify().is_err(), "no wake-up may go anywhere before a valid greeting");

        let reader = UdpSocket::bind("127.0.0.1:0").unwrap();
        reader.send_to(signal.token().unwrap().as_bytes(), addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(signal.accept_greeting());
        signal.notify().unwrap();
        let mut buf = [0u8; 8];
        reader.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        assert_eq!(reader.recv_from(&mut buf).unwrap().1, addr);
    }

    fn receive_buffer(socket: &UdpSocket) -> usize {
        let mut size: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads one int option of a socket we own into `size`.
        let got = unsafe {
            libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw mut size).cast(), &mut len)
        };
        assert_eq!(got, 0);
        size as usize
    }

    #[test]
    fn a_greeting_after_a_flood_that_filled_the_socket_connects() {
        let signal = Signal::greeting().unwrap();
        let Signal::Greeting { socket, .. } = &signal else { unreachable!() };
        let addr = signal.local_addr().unwrap();
        let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Small datagrams (the kernel counts each as a few hundred bytes),
        // some of the token's length, some longer than the read buffer,
        // until the receive buffer overflowed twice: what does not fit is
        // dropped.
        let junk = [b'x'; 100];
        let sizes = [1, signal.token().unwrap().len(), junk.len()];
        for n in 0..2 * receive_buffer(socket) / 256 {
            flood.send_to(&junk[..sizes[n % sizes.len()]], addr).unwrap();
        }
        let mut calls = 0;
        while !signal.accept_greeting() && socket.peek_from(&mut [0u8; 1]).is_ok() {
            calls += 1;
        }
        assert!(calls > 0, "the flood was read in one call: nothing bounds a call");
        assert!(!signal.accept_greeting(), "junk connected the socket");

        let reader = UdpSocket::bind("127.0.0.1:0").unwrap();
        reader.send_to(signal.token().unwrap().as_bytes(), addr).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !signal.accept_greeting() {
            assert!(std::time::Instant::now() < deadline, "the token after the flood was not taken");
        }
        assert_eq!(socket.peer_addr().unwrap(), reader.local_addr().unwrap());
    }
}
