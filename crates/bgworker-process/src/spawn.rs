//! Starting a program: its argv as given (no shell), in a process group of
//! its own, with pipes for its output and, when asked, its input.
//!
//! # Why a helper process
//!
//! A host may reap whatever child of its ends: nginx's workers call
//! `waitpid(-1)` in their SIGCHLD handler, and would take the exit status
//! of a program started here (`std::process::Command`'s children too). So
//! the program is not our child: it is the child of a helper, a fork of
//! this process that never execs. The helper is cloned with no exit signal
//! (Linux), which makes it a "clone" child, invisible to `waitpid(-1)`
//! without `__WALL` or `__WCLONE` (an exec would make it an ordinary child
//! again: the helper never execs). The helper starts the program, waits
//! for it, tells us how it ended through the status pipe, waits until we
//! close the release pipe, reaps it, and exits; we reap the helper. So:
//! - the exit status reaches us whatever the host reaps;
//! - the program's pid (its group's id) stays its own until we say it may
//!   be reaped, which we do under the lock that every signal takes
//!   (shared.rs): no signal reaches a stranger;
//! - the helper keeps no descriptor but its two pipes (a socket of the
//!   host's left open in it would outlive the host's close), and the
//!   program gets only its stdin, stdout and stderr.
//!
//! Everything the helper and the program need (the program's path, found
//! in `PATH` here, argv, the environment, the directory) is made before the
//! fork: after it they make only async-signal-safe calls. On Linux each
//! dies with its parent (`PR_SET_PDEATHSIG`): the program with the helper,
//! the helper with the thread that started it, which is the Lua thread.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

/// What to run, and how.
pub struct Request {
    /// The program (looked up in `PATH` when it has no slash), then its
    /// arguments.
    pub argv: Vec<Vec<u8>>,
    pub cwd: Option<Vec<u8>>,
    /// The whole environment, when given; else this process's.
    pub env: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// A pipe for stdin; else stdin reads nothing (`/dev/null`).
    pub stdin: bool,
}

/// A started program: its pid (also its process group's id), our ends of
/// its pipes, and its helper.
pub struct Child {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub helper: Helper,
}

/// The helper of a program, and our ends of its two pipes.
pub struct Helper {
    pid: libc::pid_t,
    /// The helper says here how the program ended: readable then.
    pub status: OwnedFd,
    /// Closed: the helper may reap the program, and exit.
    release: OwnedFd,
}

/// How a program ended: `"exit"` and its status, or `"signal"` and the
/// signal; `"exit"`, -1 when its helper died without saying.
pub type Ended = (&'static str, i32);

// The messages of the status pipe: a kind and a value, written at once.
const STARTED: i32 = 1;
const EXITED: i32 = 2;
const KILLED: i32 = 3;

fn send(fd: RawFd, kind: i32, value: i32) {
    let message = [kind, value];
    // SAFETY: 8 bytes from a live array (atomic on a pipe).
    unsafe { libc::write(fd, message.as_ptr().cast(), 8) };
}

/// `read` into `buffer` (`len` bytes at it), again when a signal
/// interrupted it: what `read` returned. Async-signal-safe.
///
/// # Safety
/// `buffer` is `len` writable bytes.
unsafe fn read_retrying(fd: RawFd, buffer: *mut libc::c_void, len: usize) -> isize {
    loop {
        // SAFETY: the caller's buffer.
        let n = unsafe { libc::read(fd, buffer, len) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return n;
        }
    }
}

/// The next message of the status pipe, or `None` at its end.
fn receive(fd: RawFd) -> Option<(i32, i32)> {
    let mut message = [0i32; 2];
    // SAFETY: a live array of 8 bytes.
    let n = unsafe { read_retrying(fd, message.as_mut_ptr().cast(), 8) };
    (n == 8).then_some((message[0], message[1]))
}

impl Helper {
    /// How the program ended, once the status pipe is readable (else it
    /// waits for that). The program is not reaped yet: see `release`.
    pub fn ended(&self) -> Ended {
        match receive(self.status.as_raw_fd()) {
            Some((EXITED, code)) => ("exit", code),
            Some((KILLED, signal)) => ("signal", signal),
            _ => ("exit", -1),
        }
    }

    /// Let the helper reap the program and exit, and reap the helper.
    pub fn release(self) {
        drop(self.release);
        let mut status = 0;
        // SAFETY: waitpid on our own (clone) child, into a live int.
        while unsafe { libc::waitpid(self.pid, &mut status, WAIT_CLONE) } < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
}

/// `waitpid`'s flag for our helpers (clone children on Linux).
#[cfg(target_os = "linux")]
const WAIT_CLONE: libc::c_int = libc::__WCLONE;
#[cfg(not(target_os = "linux"))]
const WAIT_CLONE: libc::c_int = 0;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a string contains a NUL byte"))
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The path to execute for `program`: itself when it has a slash, else the
/// first executable file of that name in `PATH` (or in the default path).
fn find_program(program: &[u8]) -> io::Result<CString> {
    if program.contains(&b'/') {
        return cstring(program);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in path.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        let candidate = Path::new(std::ffi::OsStr::from_bytes(dir)).join(std::ffi::OsStr::from_bytes(program));
        let candidate = cstring(candidate.as_os_str().as_bytes())?;
        // SAFETY: access reads a NUL-terminated path.
        if unsafe { libc::access(candidate.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOENT))
}

/// A NULL-terminated array of pointers to `strings`, which must outlive it.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(ptr::null())).collect()
}

/// Start the program (through its helper): it runs once this returns.
pub fn spawn(request: &Request) -> io::Result<Child> {
    let (program, _) = request.argv.split_first().ok_or_else(|| io::Error::other("argv is empty"))?;
    let path = find_program(program)?;
    let argv = request.argv.iter().map(|arg| cstring(arg)).collect::<io::Result<Vec<_>>>()?;
    let env = match &request.env {
        Some(env) => Some(
            env.iter()
                .map(|(name, value)| cstring(&[&name[..], b"=", &value[..]].concat()))
                .collect::<io::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let cwd = request.cwd.as_deref().map(cstring).transpose()?;
    let argv_pointers = pointers(&argv);
    let env_pointers = env.as_deref().map(pointers);
    let stdin = if request.stdin { Some(pipe()?) } else { None };
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let (exec_read, exec_write) = pipe()?;
    let (status_read, status_write) = pipe()?;
    let (release_read, release_write) = pipe()?;
    let plan = Plan {
        path: &path,
        argv: argv_pointers.as_ptr(),
        envp: env_pointers.as_ref().map(|p| p.as_ptr()),
        cwd: cwd.as_deref(),
        stdin: stdin.as_ref().map(|(read, _)| read.as_raw_fd()),
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        exec_report: exec_write.as_raw_fd(),
        status: status_write.as_raw_fd(),
        release: release_read.as_raw_fd(),
        // SAFETY: getpid has no memory effects.
        parent: unsafe { libc::getpid() },
    };
    let helper_pid = clone_helper()?;
    if helper_pid == 0 {
        // SAFETY: in the helper, just forked: it never returns.
        unsafe { plan.helper() }
    }
    // The ends of the helper and the program go: the outputs end when the
    // program and its own children close theirs, the exec report when the
    // program execs.
    drop((stdout_write, stderr_write, exec_write, status_write, release_read));
    let helper = Helper { pid: helper_pid, status: status_read, release: release_write };
    let pid = match receive(helper.status.as_raw_fd()) {
        Some((STARTED, pid)) if pid > 0 => pid,
        started => {
            helper.release();
            let errno = match started {
                Some((STARTED, minus_errno)) => -minus_errno,
                _ => libc::ECHILD,
            };
            return Err(io::Error::from_raw_os_error(errno));
        }
    };
    let mut errno = [0u8; 4];
    // SAFETY: a live buffer of 4 bytes.
    let reported = unsafe { read_retrying(exec_read.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
    if reported == 4 {
        // The program could not start: it exited, its helper says so.
        helper.ended();
        helper.release();
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok(Child {
        pid: pid as u32,
        stdin: stdin.map(|(_, write)| write),
        stdout: stdout_read,
        stderr: stderr_read,
        helper,
    })
}

/// Fork the helper: 0 in it, its pid here. On Linux a clone with no exit
/// signal (see above).
fn clone_helper() -> io::Result<libc::pid_t> {
    #[cfg(target_os = "linux")]
    // SAFETY: a clone without CLONE_VM is a fork: the helper gets a copy of
    // the address space, and runs only `Plan::helper` (async-signal-safe).
    let pid = unsafe { libc::syscall(libc::SYS_clone, 0 as libc::c_ulong, 0, 0, 0, 0) } as libc::pid_t;
    #[cfg(not(target_os = "linux"))]
    // SAFETY: as above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

extern "C" {
    /// This process's environment.
    static environ: *const *const libc::c_char;
}

/// Close every descriptor but those of `keep` (sorted): `close_range`
/// between them, or one by one up to the limit of open files.
///
/// # Safety
/// In a child of a fork (async-signal-safe calls only).
unsafe fn close_all_but(keep: &[RawFd]) {
    unsafe {
        let mut from = 0;
        for &fd in keep.iter().chain(std::iter::once(&RawFd::MAX)) {
            if fd > from {
                let last = (fd - 1) as libc::c_uint;
                #[cfg(target_os = "linux")]
                let closed = libc::syscall(libc::SYS_close_range, from as libc::c_uint, last, 0) == 0;
                #[cfg(not(target_os = "linux"))]
                let closed = false;
                if !closed {
                    let mut limit: libc::rlimit = std::mem::zeroed();
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                    let top = limit.rlim_cur.min(1 << 20) as RawFd;
                    for n in from..fd.min(top) {
                        libc::close(n);
                    }
                }
            }
            from = fd.saturating_add(1);
        }
    }
}

/// What the helper and the program do after their fork, all made before.
struct Plan<'a> {
    path: &'a CStr,
    argv: *const *const libc::c_char,
    /// `None`: this process's environment.
    envp: Option<*const *const libc::c_char>,
    cwd: Option<&'a CStr>,
    /// `None`: `/dev/null`.
    stdin: Option<RawFd>,
    stdout: RawFd,
    stderr: RawFd,
    /// The program writes its errno here when it cannot exec.
    exec_report: RawFd,
    /// The helper's ends of its pipes.
    status: RawFd,
    release: RawFd,
    parent: libc::pid_t,
}

/// Die with the parent (`parent`, the process that forked us), on Linux;
/// exit at once when it is already gone.
///
/// # Safety
/// As for `close_all_but`.
unsafe fn die_with(parent: libc::pid_t) {
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(127);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
}

impl Plan<'_> {
    /// In the helper: start the program, say so, wait for it to end, say
    /// how, wait for the release, reap it, exit.
    ///
    /// # Safety
    /// Only in the helper just forked (async-signal-safe calls only).
    unsafe fn helper(&self) -> ! {
        unsafe {
            die_with(self.parent);
            let me = libc::getpid();
            // An ordinary child (SIGCHLD): the helper reaps it.
            let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) as libc::pid_t;
            if pid == 0 {
                self.program(me)
            }
            if pid < 0 {
                send(self.status, STARTED, -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EAGAIN));
                libc::_exit(127);
            }
            send(self.status, STARTED, pid);
            let mut keep = [self.status, self.release];
            keep.sort_unstable();
            close_all_but(&keep);
            let mut info: libc::siginfo_t = std::mem::zeroed();
            while libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) != 0 {
                if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    libc::_exit(127);
                }
            }
            let (kind, value) = match info.si_code {
                libc::CLD_EXITED => (EXITED, info.si_status()),
                _ => (KILLED, info.si_status()),
            };
            send(self.status, kind, value);
            // Until the end of the release pipe (we write nothing to it).
            let mut byte = 0u8;
            read_retrying(self.release, (&mut byte as *mut u8).cast(), 1);
            libc::waitpid(pid, ptr::null_mut(), 0);
            libc::_exit(0)
        }
    }

    /// In the program's process, before its exec: set it up and exec; on
    /// any failure, report the errno and exit 127.
    ///
    /// # Safety
    /// Only in the program's process just forked (async-signal-safe calls
    /// only).
    unsafe fn program(&self, helper: libc::pid_t) -> ! {
        unsafe {
            let fail = |report: RawFd| -> ! {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                libc::write(report, (&errno as *const i32).cast(), 4);
                libc::_exit(127)
            };
            die_with(helper);
            if libc::setpgid(0, 0) != 0 {
                fail(self.exec_report);
            }
            let stdin = match self.stdin {
                Some(fd) => fd,
                None => libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC),
            };
            // Each source out of 0..=2 first (a host with its own stdio
            // closed gets pipes there), so that no dup2 overwrites the next.
            let sources = [stdin, self.stdout, self.stderr].map(|fd| match fd {
                0..=2 => libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3),
                fd => fd,
            });
            for (target, source) in sources.into_iter().enumerate() {
                if source < 0 || libc::dup2(source, target as RawFd) < 0 {
                    fail(self.exec_report);
                }
            }
            let report = match self.exec_report {
                0..=2 => libc::fcntl(self.exec_report, libc::F_DUPFD_CLOEXEC, 3),
                fd => fd,
            };
            close_all_but(&[0, 1, 2, report]);
            if let Some(cwd) = self.cwd {
                if libc::chdir(cwd.as_ptr()) != 0 {
                    fail(report);
                }
            }
            // The program starts with no signal blocked, and the default
            // action for each (the host may ignore some, SIGPIPE above all:
            // an ignored signal stays ignored across exec).
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut());
            for signal in 1..32 {
                libc::signal(signal, libc::SIG_DFL);
            }
            libc::execve(self.path.as_ptr(), self.argv, self.envp.unwrap_or(environ));
            fail(report)
        }
    }
}
