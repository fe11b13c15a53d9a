//! `bgworker.process_native`: child processes off the Lua thread.
//!
//! `spawn(argv, opts, on_event)` starts a program (spawn.rs: through a
//! helper process, which reaps it) and a thread of its own (child.rs) that
//! feeds its stdin, reads its output and learns how it ended; each event
//! reaches the Lua side through bgworker, in order, as `on_event(kind,
//! ...)` run by the dispatcher:
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
//! group gets `SIGKILL`, and the helper reaps it: never a zombie.
//!
//! `SIGNALS`: the numbers of the signals by name (`TERM`, `KILL`...).

mod child;
mod handle;
mod shared;
mod spawn;

use std::sync::{mpsc, Arc};
use std::thread;

use bgworker_util::mlua;
use bgworker_util::Sender;
use mlua::{Function, Lua, MultiValue, RegistryKey, Table, Value};

use child::{Event, Stream};
use handle::Process;
use shared::Shared;
use spawn::{Child, Request};

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

/// Hand `event` to the Lua side's `on_event` through `sender`: false when
/// it is refused (the dispatcher stopped, the state closed), or given up
/// while waiting for room once the Lua side is gone.
fn deliver(sender: &Sender, on_event: &Arc<RegistryKey>, shared: &Shared, event: Event) -> bool {
    let on_event = Arc::clone(on_event);
    let decode = move |lua: &Lua| {
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
            Event::Exit((how, code)) => ("exit", Value::String(lua.create_string(how)?), Value::Integer(code.into())),
        };
        Ok((function, values))
    };
    sender.deliver_while(decode, || !shared.lock().abandoned).is_ok()
}

/// `spawn(argv, opts, on_event)`.
fn spawn(lua: &Lua, sender: &Sender, (argv, opts, on_event): (Table, Table, Function)) -> mlua::Result<MultiValue> {
    let request = request(argv, opts)?;
    let on_event = Arc::new(lua.create_registry_value(on_event)?);
    // The thread first, which then waits for its program: a thread that
    // cannot start leaves no program behind.
    let (hand_over, handed) = mpsc::sync_channel::<(Child, Arc<Shared>)>(1);
    let sender = sender.clone();
    thread::Builder::new()
        .name("bgworker-process".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            if let Ok((child, shared)) = handed.recv() {
                child::serve(child, &shared, |event| deliver(&sender, &on_event, &shared, event));
            }
        })
        .map_err(|e| mlua::Error::runtime(format!("cannot start a thread for the process: {e}")))?;
    let mut shared = Shared::new().map_err(mlua::Error::external)?;
    let child = match spawn::spawn(&request) {
        Ok(child) => child,
        Err(e) => {
            let program = String::from_utf8_lossy(&request.argv[0]);
            let message = format!("cannot run '{program}': {}", describe(&e));
            return Ok(MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(message)?)]));
        }
    };
    shared.pid = child.pid;
    let shared = Arc::new(shared);
    let process = Process { shared: Arc::clone(&shared) };
    // The thread waits in recv: it takes the program.
    let _ = hand_over.send((child, shared));
    Ok(MultiValue::from_vec(vec![Value::UserData(lua.create_userdata(process)?)]))
}

/// The system's words for `e`, without Rust's " (os error N)".
fn describe(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
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

// They embed a Lua: `vendored` builds only.
#[cfg(all(test, feature = "vendored"))]
mod tests;
