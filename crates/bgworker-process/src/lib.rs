//! `bgworker.process_native`: child processes off the Lua thread.
//!
//! `spawn(argv, opts, on_event)` starts a program (spawn.rs) and a thread
//! of its own (child.rs) that feeds its stdin, reads its output and reaps
//! it; each event reaches the Lua side through bgworker, in order, as
//! `on_event(kind, ...)` run by the dispatcher:
//! - `on_event("stdout", chunk)`, `on_event("stderr", chunk)`: bytes as the
//!   child wrote them; `chunk` nil at the end of the stream;
//! - `on_event("exit", how, code)`: `"exit"` and the exit status, or
//!   `"signal"` and the signal that ended it. Once both outputs ended and
//!   the child exited, no other event comes.
//!
//! It returns the handle (handle.rs), or `nil, message` when the program
//! could not be started. `argv`: a list of strings, the program first (no
//! shell); `opts`: `cwd` (string), `env` (a table of strings: the whole
//! environment), `stdin` (true: a pipe for `write`; else it reads nothing).
//! It is the native half of `bgworker.process` (lua/bgworker/process.lua),
//! which checks the arguments and waits.
//!
//! The handle: `pid`, `write(data)` -> bool (false once stdin is closed),
//! `close_stdin()`, `kill(signal)` -> `true | nil, "ended" | nil, message`
//! (to the child's process group), `ack(n)` (the Lua side took `n` bytes
//! of output: past [`UNREAD_MAX`](shared::UNREAD_MAX) bytes unread, the
//! thread reads no more). When the handle is dropped, or the Lua side takes
//! no more events (the dispatcher stopped, the state closed), the child's
//! group gets `SIGKILL`, and the thread reaps the child: never a zombie.
//!
//! `SIGNALS`: the numbers of the signals by name (`TERM`, `KILL`...).

mod child;
mod handle;
mod shared;
mod spawn;

use std::sync::Arc;
use std::thread;

use bgworker_util::mlua;
use bgworker_util::Sender;
use mlua::{Function, Lua, MultiValue, Table, Value};

use child::{Event, Stream};
use handle::Process;
use shared::Shared;
use spawn::Request;

/// Stack of a child's I/O thread: it holds little (its read buffer is on
/// the heap).
const THREAD_STACK: usize = 256 * 1024;

/// The bytes of a string, or an error naming `what`.
fn bytes(value: Value, what: &str) -> mlua::Result<Vec<u8>> {
    match value {
        Value::String(s) if !s.as_bytes().contains(&0) => Ok(s.as_bytes().to_vec()),
        Value::String(_) => Err(mlua::Error::runtime(format!("{what} contains a NUL byte"))),
        other => Err(mlua::Error::runtime(format!("{what} must be a string, got {}", other.type_name()))),
    }
}

fn request(argv: Table, opts: Table) -> mlua::Result<Request> {
    let argv = (1..=argv.raw_len())
        .map(|n| bytes(argv.raw_get(n)?, &format!("argv[{n}]")))
        .collect::<mlua::Result<Vec<_>>>()?;
    let cwd = match opts.raw_get::<Value>("cwd")? {
        Value::Nil => None,
        value => Some(bytes(value, "opts.cwd")?),
    };
    let env = match opts.raw_get::<Option<Table>>("env")? {
        None => None,
        Some(env) => Some(
            env.pairs::<Value, Value>()
                .map(|pair| {
                    let (name, value) = pair?;
                    Ok((bytes(name, "a name in opts.env")?, bytes(value, "a value in opts.env")?))
                })
                .collect::<mlua::Result<Vec<_>>>()?,
        ),
    };
    Ok(Request { argv, cwd, env, stdin: opts.raw_get::<Option<bool>>("stdin")?.unwrap_or(false) })
}

/// `spawn(argv, opts, on_event)`.
fn spawn(lua: &Lua, sender: &Sender, (argv, opts, on_event): (Table, Table, Function)) -> mlua::Result<MultiValue> {
    let request = request(argv, opts)?;
    let child = match spawn::spawn(&request) {
        Ok(child) => child,
        Err(e) => {
            let program = String::from_utf8_lossy(&request.argv[0]);
            let message = format!("cannot run '{program}': {e}");
            return Ok(MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(message)?)]));
        }
    };
    let shared = Arc::new(Shared::new(child.id()).map_err(mlua::Error::external)?);
    let on_event = Arc::new(lua.create_registry_value(on_event)?);
    let sender = sender.clone();
    let for_thread = Arc::clone(&shared);
    let started = thread::Builder::new().name("bgworker-process".into()).stack_size(THREAD_STACK).spawn(move || {
        let shared = for_thread;
        child::serve(child, &shared, |event| {
            let on_event = Arc::clone(&on_event);
            let delivered = sender.deliver_while(
                move |lua| {
                    let function: Function = lua.registry_value(&on_event)?;
                    let values = match event {
                        Event::Output(stream, chunk) => {
                            let kind = match stream {
                                Stream::Stdout => "stdout",
                                Stream::Stderr => "stderr",
                            };
                            let chunk = match chunk {
                                Some(bytes) => Value::String(lua.create_string(bytes)?),
                                None => Value::Nil,
                            };
                            (kind, chunk, Value::Nil)
                        }
                        Event::Exit(how, code) => {
                            ("exit", Value::String(lua.create_string(how)?), Value::Integer(code.into()))
                        }
                    };
                    Ok((function, values))
                },
                || !shared.lock().abandoned,
            );
            delivered.is_ok()
        })
    });
    let process = Process { shared };
    if let Err(e) = started {
        // Dropping the handle kills the child; nobody would reap it: wait.
        let shared = Arc::clone(&process.shared);
        drop(process);
        // SAFETY: waitpid on our own child, which nothing else reaps.
        unsafe { libc::waitpid(shared.pid as libc::pid_t, std::ptr::null_mut(), 0) };
        return Err(mlua::Error::runtime(format!("cannot start a thread for the process: {e}")));
    }
    Ok(MultiValue::from_vec(vec![Value::UserData(lua.create_userdata(process)?)]))
}

/// The module table. Requires bgworker.core, whose instance the events go to.
#[cfg_attr(not(feature = "module"), allow(dead_code))]
#[cfg_attr(feature = "module", mlua::lua_module(name = "bgworker_process_native"))]
fn open(lua: &Lua) -> mlua::Result<Table> {
    lua.globals().get::<Function>("require")?.call::<()>("bgworker.core")?;
    let sender = Sender::new(lua)?;
    // Each running process keeps the loop alive from the Lua side.
    sender.keep_loop_alive(lua, false)?;
    let module = lua.create_table()?;
    module.set("spawn", lua.create_function(move |lua, args| spawn(lua, &sender, args))?)?;
    let signals = lua.create_table()?;
    for (name, number) in [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("PIPE", libc::SIGPIPE),
        ("ALRM", libc::SIGALRM),
        ("TERM", libc::SIGTERM),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
    ] {
        signals.set(name, number)?;
    }
    module.set("SIGNALS", signals)?;
    Ok(module)
}
