//! What the Lua side's handle of a child and the child's I/O thread share:
//! a lock over the requests that go to the thread, and a pipe that wakes
//! the thread's `poll` when one comes.
//!
//! Invariants:
//! - **A signal never reaches a stranger.** The program leads a process
//!   group of its own, whose id is its pid. That pid stays the program's
//!   until its helper reaps it, which the helper does only once the thread
//!   let it (spawn.rs), after it set `reaped` under the lock; a signal is
//!   sent only under the lock, while `reaped` is false. So no signal can
//!   reach a group whose id the system gave to another process since.
//! - **Output is bounded.** The thread reads only while fewer than
//!   [`UNREAD_MAX`] bytes it delivered wait unread on the Lua side
//!   (`unread`; the Lua side says what it took with `ack`).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Bytes of output delivered and not yet taken on the Lua side past which
/// the thread reads no more (the child then blocks on a full pipe).
pub const UNREAD_MAX: usize = 1 << 20;

/// The requests of the Lua side, and what the thread says back.
#[derive(Default)]
pub struct State {
    /// Data for the child's stdin, in order.
    pub stdin: VecDeque<Vec<u8>>,
    /// Close stdin once `stdin` was written.
    pub close_stdin: bool,
    /// The thread closed stdin (asked to, or the child closed its end):
    /// writes are refused.
    pub stdin_closed: bool,
    /// Bytes of output delivered and not yet acknowledged.
    pub unread: usize,
    /// The handle was dropped (collected, or its Lua state closed), or the
    /// Lua side can take no more deliveries: the child was killed, and the
    /// thread only waits for its end.
    pub abandoned: bool,
    /// The program ended, and its helper may reap it: its pid may belong
    /// to another process soon.
    pub reaped: bool,
}

pub struct Shared {
    /// The program's, also its process group's: set once it started,
    /// before the thread and the handle share this.
    pub pid: u32,
    state: Mutex<State>,
    /// The pipe that wakes the thread: it polls `wake_read`.
    wake_read: OwnedFd,
    wake_write: OwnedFd,
}

impl Shared {
    pub fn new() -> io::Result<Shared> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors that nothing else owns.
        let (wake_read, wake_write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Shared { pid: 0, state: Mutex::default(), wake_read, wake_write })
    }

    /// The state, locked. A panic under the lock leaves it usable: each
    /// field is consistent on its own.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Send `signal` to the child's process group, unless it was reaped:
    /// `Ok(false)` then.
    pub fn signal(&self, state: &State, signal: i32) -> io::Result<bool> {
        if state.reaped {
            return Ok(false);
        }
        // SAFETY: kill has no memory effects; the group is the child's
        // (the module's invariant).
        if unsafe { libc::kill(-(self.pid as libc::pid_t), signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    /// Wake the thread's poll. A full pipe already wakes it.
    pub fn wake(&self) {
        let byte = 1u8;
        // SAFETY: one byte from a live buffer to our own pipe.
        unsafe { libc::write(self.wake_write.as_raw_fd(), (&byte as *const u8).cast(), 1) };
    }

    /// The descriptor the thread polls for wake-ups.
    pub fn wake_fd(&self) -> i32 {
        self.wake_read.as_raw_fd()
    }

    /// Take the wake-ups that came.
    pub fn drain_wakes(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live buffer from our own non-blocking pipe.
        while unsafe { libc::read(self.wake_read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}
