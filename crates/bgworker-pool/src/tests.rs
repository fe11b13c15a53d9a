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
/// events of each job, packed as `"progress", values...`, `"done",
/// results...` or `"failed", err, traceback`, in order), `log` (every
/// event as `{id, event}`, in order), `new_pool(opts)`, `submit(p, f, ...)`
/// (the job's id, or `nil, position, message`) and `outcome(id)` (the job's "done" or "failed" event,
/// or nil).
const SETUP: &str = r##"
native = ...
events, log = {}, {}
local function record(id, event, ...)
  local list = events[id] or {}
  events[id] = list
  list[#list + 1] = table.pack(event, ...)
  log[#log + 1] = { id = id, event = event }
end
-- The pool's `on_events(list, n)`: pairs `id, value` (lib.rs).
function on_events(list, n)
  for i = 1, n, 2 do
    local id, value = list[i], list[i + 1]
    if id < 0 then
      record(-id, "progress", table.unpack(value, 1, value.n))
    elseif value == true then
      record(id, "done")
    elseif value[1] then
      record(id, "done", table.unpack(value, 2, value.n))
    else
      record(id, "failed", value[2], value[3])
    end
  end
end
function new_pool(opts)
  opts = opts or {}
  opts.threads = opts.threads or 1
  opts.path, opts.cpath, opts.on_events = package.path, package.cpath, on_events
  return native.new(opts)
end
function submit(p, f, ...)
  local id, position, message = p:queue(f, ...)
  if id then return id end
  return nil, position, message
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
