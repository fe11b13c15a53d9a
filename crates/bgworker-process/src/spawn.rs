//! Starting a child: the program and its arguments as given (no shell),
//! in a process group of its own, with pipes for its output and, when
//! asked, its input.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

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

/// Start the child. It leads a new process group (so a signal reaches the
/// processes it starts too), and on Linux it is killed when the thread
/// that starts it ends, which is the Lua thread: the whole process exiting
/// without closing its Lua state (`os.exit`) leaves no child behind.
pub fn spawn(request: &Request) -> io::Result<Child> {
    let (program, args) = request.argv.split_first().ok_or_else(|| io::Error::other("argv is empty"))?;
    let mut command = Command::new(OsStr::from_bytes(program));
    command.args(args.iter().map(|arg| OsStr::from_bytes(arg)));
    if let Some(cwd) = &request.cwd {
        command.current_dir(OsStr::from_bytes(cwd));
    }
    if let Some(env) = &request.env {
        command.env_clear();
        command.envs(env.iter().map(|(name, value)| (OsStr::from_bytes(name), OsStr::from_bytes(value))));
    }
    command
        .stdin(if request.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid has no memory effects.
        let parent = unsafe { libc::getpid() };
        // SAFETY: between fork and exec the closure calls only prctl,
        // getppid and _exit, which are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The parent may have ended before the prctl.
                if libc::getppid() != parent {
                    libc::_exit(127);
                }
                Ok(())
            });
        }
    }
    command.spawn()
}
