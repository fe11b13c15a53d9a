//! The native contract (lib.rs) against the real core, on an embedded Lua
//! 5.4 (`--features lua54,vendored`): the test plays the dispatcher
//! through bgworker-util's harness, and pools are made from the module
//! table, as the Lua layer makes them.

mod cancel;
mod close;
mod contract;
mod init;
mod progress;
mod race;

use std::ffi::c_int;
use std::thread;
use std::time::{Duration, Instant};

use bgworker_util::harness::{Harness, PATIENCE};
use mlua::FromLuaMulti;

// Links the core; its luaopen is exported by name, not by a Rust path.
use bgworker as _;

extern "C-unwind" {
    fn luaopen_bgworker_core(state: *mut mlua::lua_State) -> c_int;
}

/// Globals of the test state: `native` (the module), `events[id]` (the
/// events of each job, packed, in order), `log` (every event as `{id,
/// event}`, in order), `new_pool(opts)`, `submit(p, f, ...)` and
/// `outcome(id)` (the job's "done" or "failed" event, or nil).
const SETUP: &str = r##"
native = ...
events, log = {}, {}
function on_event(id, event, ...)
  local list = events[id] or {}
  events[id] = list
  list[#list + 1] = table.pack(event, ...)
  log[#log + 1] = { id = id, event = event }
end
function new_pool(opts)
  opts = opts or {}
  opts.threads = opts.threads or 1
  opts.path, opts.cpath, opts.on_event = package.path, package.cpath, on_event
  return native.new(opts)
end
function submit(p, f, ...)
  return p:submit(string.dump(f), false, select("#", ...), ...)
end
function outcome(id)
  for _, e in ipairs(events[id] or {}) do
    if e[1] == "done" or e[1] == "failed" then
      return e
    end
  end
end
"##;

pub struct Fixture {
    pub h: Harness,
}

impl Fixture {
    pub fn new(capacity: Option<u32>) -> Fixture {
        let h = Harness::new(luaopen_bgworker_core, capacity);
        let native = crate::exports(&h.lua).unwrap();
        h.lua.load(SETUP).call::<()>(native).unwrap();
        Fixture { h }
    }

    pub fn eval<R: FromLuaMulti>(&self, code: &str) -> R {
        self.h.lua.load(code).eval().unwrap_or_else(|e| panic!("{code}: {e}"))
    }

    pub fn exec(&self, code: &str) {
        self.eval::<()>(code)
    }

    /// Dispatch until the Lua expression `condition` is true.
    pub fn serve_until(&self, condition: &str) {
        let errors = self.h.serve_until(|| self.eval::<bool>(&format!("return {condition}")));
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// Without dispatching, wait until the Lua expression `condition` is true.
    pub fn wait_until(&self, condition: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.eval::<bool>(&format!("return {condition}")) {
            assert!(Instant::now() < deadline, "gave up waiting for {condition}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Dispatch for `time`, whatever comes.
    pub fn serve_for(&self, time: Duration) {
        let until = Instant::now() + time;
        self.serve_until_instant(until);
    }

    fn serve_until_instant(&self, until: Instant) {
        let errors = self.h.serve_until(|| Instant::now() >= until);
        assert!(errors.is_empty(), "{errors:?}");
    }
}
