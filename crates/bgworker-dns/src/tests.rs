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

#[test]
fn a_lookup_cancelled_before_its_thread_takes_it_never_calls_back() {
    let h = state(None);
    h.lua
        .load(
            r#"
            local token = require("bgworker.core").token()
            token:cancel()
            dns.resolve("localhost", function() cancelled_called = true end, token)
            dns.resolve("127.0.0.1", record, require("bgworker.core").token())
            "#,
        )
        .exec()
        .unwrap();
    h.serve_until(|| h.seen().len() == 1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(h.drain(), (0, vec![]), "nothing more arrives");
    assert!(!h.lua.load("return cancelled_called == true").eval::<bool>().unwrap());
}

#[test]
fn an_answer_on_its_way_when_cancelled_never_calls_back() {
    let h = state(None);
    h.lua.load("token = require('bgworker.core').token() dns.resolve('localhost', record, token)").exec().unwrap();
    // Answered, not yet dispatched.
    let deadline = std::time::Instant::now() + bgworker_util::harness::PATIENCE;
    while !h.lua.load("return require('bgworker.core').pending() == 1").eval::<bool>().unwrap() {
        assert!(std::time::Instant::now() < deadline, "no answer");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    h.lua.load("token:cancel()").exec().unwrap();
    assert_eq!(h.drain().1, Vec::<String>::new());
    assert!(h.seen().is_empty(), "the callback was not called");
}

#[test]
fn a_token_argument_must_be_a_token() {
    let h = state(None);
    let message: String =
        h.lua.load("local ok, err = pcall(dns.resolve, 'localhost', record, {}) return tostring(err)").eval().unwrap();
    assert!(message.contains("bad argument #3 to 'resolve' (token expected, got table)"), "{message}");
}

#[test]
fn cancel_cancels_the_token_and_takes_only_a_token() {
    let h = state(None);
    let got: (bool, bool, bool) = h
        .lua
        .load("local token = require('bgworker.core').token() return dns.cancel(token), dns.cancel(token), token:cancelled()")
        .eval()
        .unwrap();
    assert_eq!(got, (true, false, true));
    let message: String = h.lua.load("local ok, err = pcall(dns.cancel, {}) return tostring(err)").eval().unwrap();
    assert!(message.contains("bad argument #1 to 'cancel' (token expected, got table)"), "{message}");
}
