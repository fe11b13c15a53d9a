//! What a job's function becomes on its way to the workers: a Lua function
//! is dumped (its upvalues are copied with its arguments, by
//! `Values::copy_call`), a string is a "module.function" name; anything
//! else is refused, with why.
//!
//! Programs write jobs inline (`pool:submit(function() ... end)`), which
//! makes a new closure per job on Lua 5.4 and LuaJIT (5.2 and 5.3 reuse
//! one). So a function is recognised twice over, without copying it again:
//! - **by address**, a closure given before: cheapest, and it is the same
//!   object. An address names a closure only while that closure lives, so
//!   each remembered closure is held by a registry reference until another
//!   takes its place: its address cannot be reused meanwhile.
//! - **by dump**, a new closure of a function given before ([`Recent`],
//!   job.rs): closures of one prototype dump to the same bytes, and equal
//!   bytes make the same function (code, constants, debug information and
//!   upvalue names; the values of its upvalues are copied for each job).
//!   So the wrong function can never run.
//!
//! The dump goes to a buffer kept from job to job: no allocation, and no
//! Lua string, unless the function is new.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use bgworker_ffi::lua::{bytes_at, type_name};
use mlua::ffi::*;

use crate::worker::job::{Func, Recent};
use crate::worker::value::append;

/// How many closures are held for recognition by address.
const HELD: usize = 4;

/// A closure given lately, held alive by `reference`, and its function.
struct Held {
    address: *const c_void,
    reference: c_int,
    func: Arc<Func>,
}

/// The functions a pool was given lately.
#[derive(Default)]
pub struct Functions {
    held: [Option<Held>; HELD],
    /// The slot of `held` the next new closure takes.
    next: usize,
    recent: Recent,
    dump: Vec<u8>,
}

impl Functions {
    /// The job function at `index` (absolute), or why that value cannot be
    /// one (the message of a bad argument).
    pub unsafe fn at(&mut self, state: *mut lua_State, index: c_int) -> Result<Arc<Func>, String> {
        unsafe {
            let is_function = lua_type(state, index) == LUA_TFUNCTION;
            let address = lua_topointer(state, index);
            if let Some(held) = self.held.iter().flatten().find(|held| is_function && held.address == address) {
                return Ok(Arc::clone(&held.func));
            }
            if let Some(why) = refusal(state, index) {
                return Err(why);
            }
            if !is_function {
                return Ok(self.recent.get(bytes_at(state, index).unwrap_or_default(), true));
            }
            self.dump.clear();
            lua_pushvalue(state, index);
            lua_dump(state, append, (&mut self.dump as *mut Vec<u8>).cast(), 0);
            lua_pop(state, 1);
            let func = self.recent.get(&self.dump, false);
            self.hold(state, index, address, Arc::clone(&func));
            Ok(func)
        }
    }

    /// Hold the closure at `index` in place of the oldest held.
    unsafe fn hold(&mut self, state: *mut lua_State, index: c_int, address: *const c_void, func: Arc<Func>) {
        unsafe {
            lua_pushvalue(state, index);
            let reference = luaL_ref(state, LUA_REGISTRYINDEX);
            if let Some(old) = self.held[self.next].replace(Held { address, reference, func }) {
                // Frees a slot of the registry: it never raises.
                luaL_unref(state, LUA_REGISTRYINDEX, old.reference);
            }
        }
        self.next = (self.next + 1) % HELD;
    }

    /// Let go of the held closures (the pool is collected).
    pub unsafe fn release(&mut self, state: *mut lua_State) {
        for held in self.held.iter_mut().filter_map(Option::take) {
            unsafe { luaL_unref(state, LUA_REGISTRYINDEX, held.reference) };
        }
    }
}

/// Why the value at `index` cannot be a job's function, if it cannot: it
/// is neither a function nor a string; a string that is not a
/// "module.function" name; a C function. (Upvalues that cannot be copied
/// are found when they are: `Values::copy_call`.)
pub unsafe fn refusal(state: *mut lua_State, index: c_int) -> Option<String> {
    unsafe {
        match lua_type(state, index) {
            LUA_TFUNCTION if lua_iscfunction(state, index) != 0 => Some("a C function cannot move to a worker".into()),
            LUA_TFUNCTION => None,
            LUA_TSTRING => {
                let name = bytes_at(state, index).unwrap_or_default();
                (!is_name(name)).then(|| format!("'module.function' expected, got '{}'", String::from_utf8_lossy(name)))
            }
            _ => {
                let got = type_name(state, index);
                Some(format!("function or 'module.function' string expected, got {got}"))
            }
        }
    }
}

/// "module.function": a module name that does not start with a dot, a
/// dot, and a function name without dots.
fn is_name(name: &[u8]) -> bool {
    match name.iter().rposition(|&b| b == b'.') {
        Some(dot) => dot > 0 && name[0] != b'.' && dot + 1 < name.len(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_name;

    #[test]
    fn a_name_is_a_module_a_dot_and_a_function() {
        for good in ["a.b", "a.b.c", "a..b", "string.rep"] {
            assert!(is_name(good.as_bytes()), "{good}");
        }
        for bad in ["", "nodot", ".a", "a.", ".", "a.b."] {
            assert!(!is_name(bad.as_bytes()), "{bad}");
        }
    }
}
