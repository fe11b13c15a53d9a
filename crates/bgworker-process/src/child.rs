//! A program's I/O thread: it writes what the Lua side queued for stdin,
//! reads stdout and stderr as the program writes them, learns from the
//! program's helper (spawn.rs) how it ended, and hands each of those
//! events to `deliver`, in order. It ends once the program ended and both
//! outputs reached their end.
//!
//! The thread waits in `poll`: on the outputs (unless `UNREAD_MAX` bytes
//! wait unread on the Lua side), on stdin while there is data for it, on
//! the wake-up pipe of [`Shared`], and on the helper's status pipe, which
//! becomes readable when the program ended.
//!
//! When the Lua side is gone (its handle was dropped) or takes no more
//! events (a delivery was refused: the dispatcher stopped, the Lua state
//! closed), the program was killed (`SIGKILL` to its group): the thread
//! closes the pipes, says the outputs ended, waits for the program's end
//! and says how it ended (deliveries that are refused are dropped).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::shared::{Shared, UNREAD_MAX};
use crate::spawn::{Child, Ended, Helper};

/// Bytes read from an output at a time.
const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

pub enum Event {
    /// Bytes the program wrote, or `None` at the end of the stream.
    Output(Stream, Option<Vec<u8>>),
    /// How the program ended.
    Exit(Ended),
}

/// Serve `child` until it ended and its outputs ended. `deliver` returns
/// false when the Lua side takes no more events.
pub fn serve(child: Child, shared: &Shared, mut deliver: impl FnMut(Event) -> bool) {
    block_sigpipe();
    let mut outputs = [Some(child.stdout), Some(child.stderr)];
    let mut stdin = child.stdin;
    match &stdin {
        Some(fd) => set_nonblocking(fd.as_raw_fd()),
        // Its stdin reads nothing: writes are refused.
        None => shared.lock().stdin_closed = true,
    }
    let mut helper = Some(child.helper);
    let mut buffer = vec![0u8; CHUNK];
    let mut refused = false;
    loop {
        let (abandoned, paused, writing) = {
            let mut state = shared.lock();
            if refused && !state.abandoned {
                state.abandoned = true;
                let _ = shared.signal(&state, libc::SIGKILL);
            }
            if stdin.is_some() && state.close_stdin && state.stdin.is_empty() {
                stdin = None;
                state.stdin_closed = true;
            }
            (state.abandoned, state.unread >= UNREAD_MAX, !state.stdin.is_empty())
        };
        if abandoned {
            break;
        }
        if helper.is_none() && outputs.iter().all(Option::is_none) {
            return;
        }
        let mut fds = Vec::with_capacity(5);
        let mut watch = |fd: RawFd, events: i16| {
            fds.push(libc::pollfd { fd, events, revents: 0 });
            fds.len() - 1
        };
        let wake = watch(shared.wake_fd(), libc::POLLIN);
        let readers: Vec<(usize, usize)> = outputs
            .iter()
            .enumerate()
            .filter(|_| !paused)
            .filter_map(|(n, fd)| fd.as_ref().map(|fd| (n, watch(fd.as_raw_fd(), libc::POLLIN))))
            .collect();
        let writer = stdin.as_ref().filter(|_| writing).map(|fd| watch(fd.as_raw_fd(), libc::POLLOUT));
        let status = helper.as_ref().map(|helper| watch(helper.status.as_raw_fd(), libc::POLLIN));
        // SAFETY: `fds` is a live array of `fds.len()` pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            continue; // EINTR
        }
        let ready = |index: usize| fds[index].revents != 0;
        if ready(wake) {
            shared.drain_wakes();
        }
        for (n, index) in readers {
            if !ready(index) {
                continue;
            }
            let fd = outputs[n].as_ref().map_or(-1, AsRawFd::as_raw_fd);
            // SAFETY: reads into a live buffer from our own descriptor.
            let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if read <= 0 {
                outputs[n] = None;
                refused |= !deliver(Event::Output(STREAMS[n], None));
            } else {
                shared.lock().unread += read as usize;
                refused |= !deliver(Event::Output(STREAMS[n], Some(buffer[..read as usize].to_vec())));
            }
        }
        if writer.is_some_and(ready) && !write_some(&stdin, shared) {
            stdin = None;
        }
        if status.is_some_and(ready) {
            if let Some(helper) = helper.take() {
                refused |= !deliver(Event::Exit(finish(helper, shared)));
            }
        }
    }
    // Abandoned: nobody reads any more.
    drop(stdin);
    for (n, output) in outputs.iter_mut().enumerate() {
        if output.take().is_some() {
            deliver(Event::Output(STREAMS[n], None));
        }
    }
    if let Some(helper) = helper {
        deliver(Event::Exit(finish(helper, shared)));
    }
}

/// How the program ended (waiting for it), marked reaped under the lock
/// before its helper may reap it (shared.rs), then its helper reaped.
fn finish(helper: Helper, shared: &Shared) -> Ended {
    let ended = helper.ended();
    shared.lock().reaped = true;
    helper.release();
    ended
}

/// Write what the Lua side queued for stdin, as much as the pipe takes.
/// False when stdin is closed for good (the program closed its end).
fn write_some(stdin: &Option<OwnedFd>, shared: &Shared) -> bool {
    let Some(fd) = stdin.as_ref() else { return false };
    let mut state = shared.lock();
    while let Some(front) = state.stdin.front_mut() {
        // SAFETY: writes from a live buffer to our own descriptor.
        let written = unsafe { libc::write(fd.as_raw_fd(), front.as_ptr().cast(), front.len()) };
        if written < 0 {
            match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => return true,
                _ => {
                    state.stdin.clear();
                    state.stdin_closed = true;
                    return false;
                }
            }
        }
        front.drain(..written as usize);
        if front.is_empty() {
            state.stdin.pop_front();
        }
    }
    true
}

/// A write to a pipe whose reader is gone raises SIGPIPE, which would end
/// the whole process (the host's disposition, which a library must not
/// change): blocked on this thread, it stays pending here, and the write
/// fails with EPIPE.
fn block_sigpipe() {
    // SAFETY: a local signal set, for this thread's own mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
}
