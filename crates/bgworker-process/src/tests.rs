//! `spawn` against the real core, on an embedded Lua 5.4 (`--features
//! lua54,vendored`), with the test playing the dispatcher.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use bgworker_util::harness::Harness;
use bgworker_util::mlua;

// Links the core; its luaopen is exported by name, not by a Rust path.
use bgworker as _;

extern "C-unwind" {
    fn luaopen_bgworker_core(state: *mut mlua::lua_State) -> c_int;
}

/// A state with the core started and the module in the global `process`;
/// `start(argv)` spawns with `record` as its events' handler.
fn state() -> Harness {
    let h = Harness::new(luaopen_bgworker_core, None);
    let module = crate::open(&h.lua).unwrap();
    h.lua.globals().set("process", module).unwrap();
    h.lua.load("function start(argv, opts) return assert(process.spawn(argv, opts or {}, record)) end").exec().unwrap();
    h
}

/// The `exit` events recorded: how, and the code.
fn exits(h: &Harness) -> Vec<(String, i64)> {
    h.seen()
        .iter()
        .filter(|event| matches!(&event[0], mlua::Value::String(s) if s.as_bytes() == b"exit"))
        .map(|event| (event[1].to_string().unwrap(), event[2].as_i64().unwrap()))
        .collect()
}

#[test]
fn the_exit_status_arrives_though_the_host_reaps_any_child() {
    // A host with a SIGCHLD handler that reaps whatever ends (nginx's
    // workers): here, a thread that keeps calling waitpid(-1).
    let reaping = Arc::new(AtomicBool::new(true));
    let reaper = {
        let reaping = Arc::clone(&reaping);
        thread::spawn(move || {
            while reaping.load(Ordering::Relaxed) {
                // SAFETY: waitpid with a null status.
                unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
                thread::yield_now();
            }
        })
    };
    let h = state();
    h.lua.load("for i = 0, 19 do start { 'sh', '-c', 'exit ' .. i } end").exec().unwrap();
    h.serve_until(|| exits(&h).len() == 20);
    reaping.store(false, Ordering::Relaxed);
    reaper.join().unwrap();
    let mut codes: Vec<i64> =
        exits(&h).into_iter().map(|(how, code)| if how == "exit" { code } else { -100 }).collect();
    codes.sort_unstable();
    assert_eq!(codes, (0..20).collect::<Vec<i64>>());
}

#[test]
fn a_signal_reaches_the_program_until_it_ended_then_none() {
    let h = state();
    h.lua.load("p = start { 'sleep', '30' }").exec().unwrap();
    assert!(h.lua.load("return p:kill(15)").eval::<bool>().unwrap());
    h.serve_until(|| exits(&h).len() == 1);
    assert_eq!(exits(&h), [("signal".to_string(), 15)]);
    let (ok, why): (Option<bool>, String) = h.lua.load("return p:kill(9)").eval().unwrap();
    assert_eq!((ok, why.as_str()), (None, "ended"));
}

#[test]
fn a_program_that_cannot_start_says_why() {
    let h = state();
    let (handle, why): (mlua::Value, String) =
        h.lua.load("return process.spawn({ 'bgworker-no-such-program' }, {}, record)").eval().unwrap();
    assert!(handle.is_nil());
    assert_eq!(why, "cannot run 'bgworker-no-such-program': No such file or directory");
    let (_, why): (mlua::Value, String) =
        h.lua.load("return process.spawn({ 'true' }, { cwd = '/no/such/dir' }, record)").eval().unwrap();
    assert_eq!(why, "cannot run 'true': No such file or directory");
}
