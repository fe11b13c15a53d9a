//! `Token` against the real core's `core.token()`, on an embedded Lua 5.4
//! (`--features lua54,vendored`).

use std::ffi::c_int;
use std::sync::Arc;
use std::thread;

use bgworker_util::harness::Harness;
use bgworker_util::mlua::{self, Lua, Value};
use bgworker_util::{Error, Token};

// Links the core; its luaopen is exported by name, not by a Rust path.
use bgworker as _;

extern "C-unwind" {
    fn luaopen_bgworker_core(state: *mut mlua::lua_State) -> c_int;
}

fn harness() -> Harness {
    Harness::new(luaopen_bgworker_core, None)
}

fn token(lua: &Lua, code: &str) -> Option<Token> {
    let value: Value = lua.load(code).eval().unwrap();
    Token::from_lua(lua, &value).unwrap()
}

#[test]
fn a_token_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Token>();
}

#[test]
fn a_thread_sees_the_lua_side_cancel() {
    let h = harness();
    let shared = Arc::new(token(&h.lua, "t = require('bgworker.core').token() return t").unwrap());
    let before = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || shared.is_cancelled()).join().unwrap()
    };
    assert!(!before);
    assert_eq!(
        h.lua.load("return t:cancel(), t:cancel(), t:cancelled()").eval::<(bool, bool, bool)>().unwrap(),
        (true, false, true)
    );
    let after = thread::spawn(move || shared.is_cancelled()).join().unwrap();
    assert!(after);
}

#[test]
fn a_token_is_cancelled_when_its_state_closes() {
    let h = harness();
    let (kept, collected) = (
        token(&h.lua, "return require('bgworker.core').token()").unwrap(),
        token(&h.lua, "return (require('bgworker.core').token())").unwrap(),
    );
    // The Lua side dropped both; collecting a token cancels nothing.
    h.lua.gc_collect().unwrap();
    assert!(!kept.is_cancelled() && !collected.is_cancelled());
    drop(h);
    assert!(kept.is_cancelled() && collected.is_cancelled());
}

#[test]
fn other_values_are_not_tokens() {
    let h = harness();
    for code in [
        "return 1",
        "return {}",
        "return io.stdout",
        "return nil",
        "return setmetatable({}, getmetatable(require('bgworker.core').token()))",
    ] {
        assert!(token(&h.lua, code).is_none(), "{code}");
    }
    let plain = Lua::new();
    assert_eq!(Token::from_lua(&plain, &Value::Nil).unwrap_err(), Error::NotLoaded);
}

#[test]
fn token_methods_check_their_self() {
    let h = harness();
    let message: String = h
        .lua
        .load(
            "local t = require('bgworker.core').token() local ok, err = pcall(function() t.cancel({}) end) return err",
        )
        .eval()
        .unwrap();
    assert!(message.contains("bad argument #1 to 'cancel' (token expected, got table"), "{message}");
}
