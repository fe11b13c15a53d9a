//! Test support for utility libraries (`vendored` builds only, which embed
//! a Lua for Rust tests): a Lua state with the real bgworker core started
//! and a dispatcher played by the test itself, through the wake protocol: a
//! UDP socket receives the core's datagrams, and `drain` polls.
//!
//! The test binary links the core (a dev-dependency on the `bgworker`
//! crate) and hands its `luaopen_bgworker_core` to [`Harness::new`]: this
//! crate never links against bgworker.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, Table};

/// How long a harness waits for anything before it fails the test.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A Lua state with bgworker.core started, and the socket its wake-ups go to.
pub struct Harness {
    pub lua: Lua,
    pub socket: UdpSocket,
    /// `drain()`: poll and call until the queue is empty, each item under
    /// pcall, inside a coroutine (so decode pushes onto a coroutine's
    /// stack); returns the items run and their error messages.
    drain: Function,
}

const DRAIN: &str = r#"
local core = require "bgworker.core"
local function run(f, ...)
  if f == nil then return false end
  f(...)
  return true
end
local function step() return run(core.poll()) end
return function()
  return coroutine.wrap(function()
    local n, errors = 0, {}
    while true do
      local ok, more = pcall(step)
      if ok and not more then return n, errors end
      if not ok then errors[#errors + 1] = tostring(more) end
      n = n + 1
    end
  end)()
end
"#;

impl Harness {
    /// A state (with every standard library) where `require "bgworker.core"`
    /// opens `open_core`, started with `capacity`. It defines the global
    /// `record(...)`, which appends its arguments to the global `seen`.
    pub fn new(open_core: mlua::ffi::lua_CFunction, capacity: Option<u32>) -> Harness {
        // SAFETY: a plain Lua state for tests; the debug library included.
        let lua = unsafe { Lua::unsafe_new() };
        // SAFETY: the core's luaopen is a lua_CFunction.
        let open = unsafe { lua.create_c_function(open_core) }.unwrap();
        lua.preload_module("bgworker.core", open).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let opts = lua.create_table().unwrap();
        opts.set("capacity", capacity).unwrap();
        let core: Table = lua.load("return require 'bgworker.core'").eval().unwrap();
        core.get::<Function>("start").unwrap().call::<()>((socket.local_addr().unwrap().port(), opts)).unwrap();
        let (ip, port): (String, u16) = core.get::<Function>("sender").unwrap().call(()).unwrap();
        socket.connect((ip.as_str(), port)).unwrap();
        let drain = lua.load(DRAIN).eval().unwrap();
        lua.load("seen = {} function record(...) seen[#seen + 1] = {...} return ... end").exec().unwrap();
        Harness { lua, socket, drain }
    }

    pub fn core(&self) -> Table {
        self.lua.load("return require 'bgworker.core'").eval().unwrap()
    }

    /// What `record` received, call by call.
    pub fn seen(&self) -> Vec<Vec<mlua::Value>> {
        self.lua.globals().get("seen").unwrap()
    }

    /// Poll until the queue is empty: the items run and the errors raised.
    pub fn drain(&self) -> (usize, Vec<String>) {
        self.drain.call(()).unwrap()
    }

    /// Wait for a wake-up, read every datagram waiting, then drain.
    pub fn wait(&self) -> (usize, Vec<String>) {
        self.socket.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0; 16];
        self.socket.recv(&mut buf).expect("a wake-up datagram");
        self.socket.set_nonblocking(true).unwrap();
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false).unwrap();
        self.drain()
    }

    /// Drain on wake-ups until `done` says so; the errors raised meanwhile.
    /// Fails the test after [`PATIENCE`].
    pub fn serve_until(&self, mut done: impl FnMut() -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut errors = Vec::new();
        while !done() {
            assert!(Instant::now() < deadline, "gave up waiting");
            self.socket.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            let mut buf = [0; 16];
            if self.socket.recv(&mut buf).is_ok() {
                errors.extend(self.drain().1);
            }
        }
        errors
    }

    /// `core.stop()`: the number of items cancelled.
    pub fn stop(&self) -> usize {
        self.core().get::<Function>("stop").unwrap().call(()).unwrap()
    }
}
