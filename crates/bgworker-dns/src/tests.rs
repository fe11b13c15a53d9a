//! `resolve` against the real core, on an embedded Lua 5.4 (`--features
//! lua54,vendored`), with the test playing the dispatcher.

use std::ffi::c_int;

use bgworker_util::harness::Harness;
use bgworker_util::mlua;

// Links the core; its luaopen is exported by name, not by a Rust path.
use bgworker as _;

extern "C-unwind" {
    fn luaopen_bgworker_core(state: *mut mlua::lua_State) -> c_int;
}

/// A state with the core started and the module in the global `dns`.
fn state(capacity: Option<u32>) -> Harness {
    let h = Harness::new(luaopen_bgworker_core, capacity);
    let module = crate::open(&h.lua).unwrap();
    h.lua.globals().set("dns", module).unwrap();
    h
}

#[test]
fn a_state_that_does_not_drain_never_delays_another_states_lookups() {
    let stalled = state(Some(1));
    let other = state(None);
    // 40 answers for a queue of one that nobody drains: its threads wait.
    stalled.lua.load("for i = 1, 40 do dns.resolve('localhost', record) end").exec().unwrap();
    other.lua.load("dns.resolve('127.0.0.1', record)").exec().unwrap();
    other.serve_until(|| other.seen().len() == 1);
    let answer: String = other.lua.load("return seen[1][1][1]").eval().unwrap();
    assert_eq!(answer, "127.0.0.1");
    // The stalled state still gets every answer once it drains.
    stalled.serve_until(|| stalled.seen().len() == 40);
}
