//! A child's I/O thread: it writes what the Lua side queued for stdin,
//! reads stdout and stderr as the child writes them, reaps the child, and
//! hands each of those events to `deliver`, in order. It ends once the
//! child was reaped and both outputs reached their end.
//!
//! The thread waits in `poll`: on the outputs (unless `UNREAD_MAX` bytes
//! wait unread on the Lua side), on stdin while there is data for it, on
//! the wake-up pipe of [`Shared`], and on a pidfd of the child (Linux 5.3
//! and later: without one, it looks at the child every 20 ms until it
//! ended).
//!
//! When the Lua side is gone (its handle was dropped) or takes no more
//! events (a delivery was refused: the dispatcher stopped, the Lua state
//! closed), the child was killed (`SIGKILL` to its group): the thread
//! closes the pipes, says the outputs ended, reaps the child and says how
//! it ended (deliveries that are refused are dropped).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};

use crate::shared::{Shared, UNREAD_MAX};

/// Bytes read from an output at a time.
const CHUNK: usize = 64 * 1024;
/// How often the child is looked at without a pidfd, in milliseconds.
const REAP_EVERY_MS: i32 = 20;

#[derive(Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

pub enum Event {
    /// Bytes the child wrote, or `None` at the end of the stream.
    Output(Stream, Option<Vec<u8>>),
    /// How the child ended: `"exit"` and its status, or `"signal"` and the
    /// signal.
    Exit(&'static str, i32),
}

/// Serve `child` until it was reaped and its outputs ended. `deliver`
/// returns false when the Lua side takes no more events.
pub fn serve(mut child: Child, shared: &Shared, mut deliver: impl FnMut(Event) -> bool) {
    block_sigpipe();
    let mut outputs = [child.stdout.take().map(OwnedFd::from), child.stderr.take().map(OwnedFd::from)];
    let mut stdin = child.stdin.take().map(OwnedFd::from);
    if let Some(fd) = &stdin {
        set_nonblocking(fd.as_raw_fd());
    }
    let pidfd = pidfd_open(shared.pid);
    let mut exited = false;
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
        if exited && outputs.iter().all(Option::is_none) {
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
        let reaper = pidfd.as_ref().filter(|_| !exited).map(|fd| watch(fd.as_raw_fd(), libc::POLLIN));
        let timeout = if exited || pidfd.is_some() { -1 } else { REAP_EVERY_MS };
        // SAFETY: `fds` is a live array of `fds.len()` pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) } < 0 {
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
            let stream = if n == 0 { Stream::Stdout } else { Stream::Stderr };
            let fd = outputs[n].as_ref().map_or(-1, AsRawFd::as_raw_fd);
            // SAFETY: reads into a live buffer from our own descriptor.
            let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if read <= 0 {
                outputs[n] = None;
                refused |= !deliver(Event::Output(stream, None));
            } else {
                shared.lock().unread += read as usize;
                refused |= !deliver(Event::Output(stream, Some(buffer[..read as usize].to_vec())));
            }
        }
        if writer.is_some_and(ready) && !write_some(&mut stdin, shared) {
            stdin = None;
        }
        if !exited && (reaper.is_none_or(ready)) {
            if let Some(status) = reap(&mut child, shared) {
                exited = true;
                refused |= !deliver(exit_event(status));
            }
        }
    }
    // Abandoned: nobody reads any more.
    drop(stdin);
    for (n, output) in outputs.iter_mut().enumerate() {
        if output.take().is_some() {
            deliver(Event::Output(if n == 0 { Stream::Stdout } else { Stream::Stderr }, None));
        }
    }
    if !exited {
        let status = loop {
            wait_for_exit(shared.pid);
            if let Some(status) = reap(&mut child, shared) {
                break status;
            }
        };
        deliver(exit_event(status));
    }
}

/// Write what the Lua side queued for stdin, as much as the pipe takes.
/// False when stdin is closed for good (the child closed its end).
fn write_some(stdin: &mut Option<OwnedFd>, shared: &Shared) -> bool {
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

/// Reap the child if it ended, under the lock (shared.rs).
fn reap(child: &mut Child, shared: &Shared) -> Option<ExitStatus> {
    let mut state = shared.lock();
    let status = match child.try_wait() {
        Ok(status) => status,
        // ECHILD: reaped elsewhere (SIGCHLD ignored): how it ended is lost.
        Err(_) => Some(ExitStatus::from_raw(0xff << 8)),
    };
    state.reaped |= status.is_some();
    status
}

/// Wait until the child ended, without reaping it.
fn wait_for_exit(pid: u32) {
    // SAFETY: waitid fills a live siginfo_t.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT);
    }
}

fn exit_event(status: ExitStatus) -> Event {
    match (status.code(), status.signal()) {
        (Some(code), _) => Event::Exit("exit", code),
        (None, Some(signal)) => Event::Exit("signal", signal),
        (None, None) => Event::Exit("exit", -1),
    }
}

/// A descriptor that becomes readable when process `pid` ends (Linux 5.3
/// and later), or `None`.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the syscall returns a fresh descriptor, or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: a fresh descriptor that nothing else owns.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
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
