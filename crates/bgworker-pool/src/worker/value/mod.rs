//! Values that cross between Lua states by copy.
//!
//! `Values::copy` reads Lua values off a state's stack into plain Rust data
//! (no Lua reference survives it, so the result is `Send`);
//! `Values::push` makes them anew on another state's stack. Both use Lua's
//! C API: they are on the hot path of every job. Which values cross is
//! stated once, for users, in docs/jobs.md ("A job's function and its
//! values"); this module implements it: [`copy`] reads, this file holds
//! what was read and makes it again. Tables are read and written raw, so
//! metatables stay behind.
//!
//! A job's arguments are copied with the upvalues of its function
//! (`copy_call`), in one copy: a table that both reach is one table in the
//! worker too.

mod copy;
#[cfg(test)]
mod tests;

use std::ffi::c_int;
use std::ptr;

use bgworker_ffi::lua::{push_str, tostring, type_name, upvalue_join};
use mlua::ffi::*;

pub(crate) use copy::append;
use copy::Copier;
pub use copy::CrossError;

/// Deepest table nesting that crosses: bounds the recursion of both copy and
/// push, on threads whose stacks are of ordinary size.
pub const MAX_DEPTH: usize = 200;

/// Most values of one job's results, or of one progress event, that cross
/// to the Lua thread: as many as its Lua code can then spread on a stack,
/// which the Lua layer does (`unpack(outcome, 1, outcome.n)`) to call a
/// callback or return from `get`, with room to spare for the C functions
/// that pass them on (a `coroutine.resume`, say). Lua 5.1 and LuaJIT let a
/// C function, `unpack` among them, use at most 8000 stack slots
/// (LUAI_MAXCSTACK): 100 are left. Later versions limit a coroutine's
/// whole stack to 1,000,000 slots (LUAI_MAXSTACK): nine tenths are left to
/// whatever that stack already holds when the values arrive.
#[cfg(any(feature = "lua51", feature = "luajit"))]
pub const MAX_VALUES: usize = 7_900;
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
pub const MAX_VALUES: usize = 100_000;

/// Whether `load` sets a function's first upvalue to the global table
/// (Lua 5.2 and later); on Lua 5.1 and LuaJIT it leaves it nil.
const LOAD_SETS_FIRST_UPVALUE: bool = !cfg!(any(feature = "lua51", feature = "luajit"));

enum Value {
    Nil,
    Boolean(bool),
    Integer(lua_Integer),
    Number(lua_Number),
    String(Box<[u8]>),
    /// An index into `Values::tables`.
    Table(usize),
    /// An index into `Values::functions`.
    Function(usize),
}

/// A Lua function that crosses (as an upvalue only: see [`copy`]).
struct Function {
    /// Its dump; empty for the job's own function, which the worker has
    /// (its `Func`).
    code: Box<[u8]>,
    /// Its upvalues, in order.
    upvalues: Vec<Upvalue>,
}

enum Upvalue {
    /// The global table (`_ENV`, or a local that holds it): the receiving
    /// state's own.
    Globals,
    Value(Value),
    /// The same variable as upvalue `n` of `Values::functions[function]`,
    /// which comes first.
    Shared {
        function: usize,
        n: c_int,
    },
}

/// Values copied out of a Lua state.
///
/// Invariant (built by `Copier` only): every `Value::Table(i)` indexes
/// `tables`, and a table never reaches itself, so `push` terminates
/// within `MAX_DEPTH` levels; every `Value::Function(i)` and
/// `Upvalue::Shared` indexes `functions`, and `push` makes a function
/// before its upvalues, so a function that reaches itself is found made.
#[derive(Default)]
pub struct Values {
    list: Vec<Value>,
    tables: Vec<Vec<(Value, Value)>>,
    functions: Vec<Function>,
    /// The function these values are the arguments of (`copy_call`), as
    /// an index into `functions`, when its upvalues must be set.
    callee: Option<usize>,
}

impl Values {
    /// How many values (top-level) there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Copy the `count` values from stack index `first` up. It only reads
    /// (it never raises, so it may own what it likes). On failure, the
    /// position (from 0) of the value that cannot cross, and why.
    ///
    /// # Safety
    /// `state` is valid, on its thread, and holds those values.
    pub unsafe fn copy(state: *mut lua_State, first: c_int, count: c_int) -> Result<Values, (usize, CrossError)> {
        let mut copier = Copier::new();
        let list = unsafe { copy_list(&mut copier, state, first, count) }?;
        Ok(copier.finish(list, None))
    }

    /// Copy the arguments of a call as `copy` does, with the upvalues of
    /// the function at `function` (a job's, which `lua::function` accepted)
    /// when it has some to set: see [`Values::sets_upvalues`]. On failure,
    /// the position of the value that cannot cross: 0 for the function
    /// (an upvalue), from 1 an argument.
    ///
    /// # Safety
    /// As for `copy`, with the function at `function`.
    pub unsafe fn copy_call(
        state: *mut lua_State,
        function: c_int,
        first: c_int,
        count: c_int,
    ) -> Result<Values, (usize, CrossError)> {
        let mut copier = Copier::new();
        let function = unsafe { lua_absindex(state, function) };
        let callee = unsafe { copier.callee(state, function) }.map_err(|e| (0, e))?;
        let list = unsafe { copy_list(&mut copier, state, first, count) }.map_err(|(n, e)| (n + 1, e))?;
        Ok(copier.finish(list, callee))
    }

    /// Whether the function these values are the arguments of has
    /// upvalues to set: it must then be loaded anew, not reused.
    pub fn sets_upvalues(&self) -> bool {
        self.callee.is_some()
    }

    /// Push the values onto `state`'s stack; returns how many. It may raise
    /// (out of memory, or no stack space), and borrows only: call it where
    /// raising is allowed (`bgworker_ffi::lua::protect`, or a decode).
    ///
    /// # Safety
    /// `state` is valid, on its thread.
    pub unsafe fn push(&self, state: *mut lua_State) -> c_int {
        unsafe { self.push_call(state, |_| {}) }
    }

    /// Push a call: `push_function` pushes the function (with upvalues
    /// to set, a fresh one of its own), whose upvalues are then set, and
    /// the values after it, as `push` does, which returns how many.
    ///
    /// # Safety
    /// As for `push`; `push_function` pushes one function when these are
    /// the arguments of `copy_call`, nothing otherwise.
    pub unsafe fn push_call(&self, state: *mut lua_State, push_function: impl FnOnce(*mut lua_State)) -> c_int {
        unsafe {
            luaL_checkstack(state, self.list.len() as c_int + 3, ptr::null());
            self.with_made(state, |made| {
                push_function(state);
                if let Some(callee) = self.callee {
                    lua_pushvalue(state, -1);
                    lua_rawseti(state, made, self.function_key(callee));
                    self.set_upvalues(state, made, lua_gettop(state), &self.functions[callee].upvalues);
                }
                for value in &self.list {
                    self.push_value(state, made, value);
                }
            });
            self.list.len() as c_int
        }
    }

    /// Set the values as `list[offset + 1]`, `list[offset + 2]`..., each
    /// as soon as it is made: however many they are, they take a few
    /// stack slots only (per table level). It may raise, as `push` does.
    ///
    /// # Safety
    /// As for `push`; `list` is the absolute index of a table.
    pub unsafe fn set_into(&self, state: *mut lua_State, list: c_int, offset: c_int) {
        unsafe {
            luaL_checkstack(state, 2, ptr::null());
            self.with_made(state, |made| {
                for (index, value) in (offset + 1..).zip(&self.list) {
                    self.push_value(state, made, value);
                    lua_rawseti(state, list, lua_Integer::from(index));
                }
            });
        }
    }

    /// Run `body` with the table of the tables and functions made so far
    /// (so that a shared one is made once) at stack index `made` (0 when
    /// the values hold none), then remove it. On the stack: nothing Rust
    /// owns while Lua may raise.
    ///
    /// # Safety
    /// As for `push`, with a free stack slot.
    unsafe fn with_made(&self, state: *mut lua_State, body: impl FnOnce(c_int)) {
        unsafe {
            let made = match self.tables.len() + self.functions.len() {
                0 => 0,
                n => {
                    lua_createtable(state, n as c_int, 0);
                    lua_gettop(state)
                }
            };
            body(made);
            if made != 0 {
                lua_remove(state, made);
            }
        }
    }

    /// The key of `functions[function]` in the table of made values; the
    /// tables take the keys before.
    fn function_key(&self, function: usize) -> lua_Integer {
        (self.tables.len() + function + 1) as lua_Integer
    }

    /// # Safety
    /// As for `push`; `made` is its table of made values.
    unsafe fn push_value(&self, state: *mut lua_State, made: c_int, value: &Value) {
        unsafe {
            match value {
                Value::Nil => lua_pushnil(state),
                Value::Boolean(b) => lua_pushboolean(state, *b as c_int),
                Value::Integer(i) => lua_pushinteger(state, *i),
                Value::Number(n) => lua_pushnumber(state, *n),
                Value::String(bytes) => push_str(state, bytes),
                Value::Table(index) => self.push_table(state, made, *index),
                Value::Function(index) => self.push_function(state, made, *index),
            }
        }
    }

    /// # Safety
    /// As for `push_value`.
    unsafe fn push_table(&self, state: *mut lua_State, made: c_int, index: usize) {
        unsafe {
            let key = index as lua_Integer + 1;
            if lua_rawgeti(state, made, key) != LUA_TNIL {
                return;
            }
            lua_pop(state, 1);
            // A key, a value and the table, per level.
            luaL_checkstack(state, 3, ptr::null());
            let entries = &self.tables[index];
            let sequence = entries
                .iter()
                .filter(|(key, _)| matches!(key, Value::Integer(i) if *i >= 1 && *i as u64 <= entries.len() as u64))
                .count();
            lua_createtable(state, sequence as c_int, (entries.len() - sequence) as c_int);
            for (key, value) in entries {
                self.push_value(state, made, key);
                self.push_value(state, made, value);
                lua_rawset(state, -3);
            }
            lua_pushvalue(state, -1);
            lua_rawseti(state, made, key);
        }
    }

    /// Push `functions[index]`: loaded from its dump (a load error is
    /// raised), then marked made, then given its upvalues.
    ///
    /// # Safety
    /// As for `push_value`.
    unsafe fn push_function(&self, state: *mut lua_State, made: c_int, index: usize) {
        unsafe {
            let key = self.function_key(index);
            if lua_rawgeti(state, made, key) != LUA_TNIL {
                return;
            }
            lua_pop(state, 1);
            // The function, a copy and an upvalue, per level.
            luaL_checkstack(state, 3, ptr::null());
            let function = &self.functions[index];
            let (code, mode) = (&function.code, c"b");
            if luaL_loadbufferx(state, code.as_ptr().cast(), code.len(), c"=upvalue".as_ptr(), mode.as_ptr()) != LUA_OK
            {
                lua_error(state);
            }
            lua_pushvalue(state, -1);
            lua_rawseti(state, made, key);
            self.set_upvalues(state, made, lua_gettop(state), &function.upvalues);
        }
    }

    /// Set `upvalues` as those of the function at `function` (absolute).
    ///
    /// # Safety
    /// As for `push_value`, with two free stack slots.
    unsafe fn set_upvalues(&self, state: *mut lua_State, made: c_int, function: c_int, upvalues: &[Upvalue]) {
        unsafe {
            for (n, upvalue) in (1..).zip(upvalues) {
                match upvalue {
                    Upvalue::Globals => {
                        lua_pushglobaltable(state);
                    }
                    Upvalue::Value(value) => self.push_value(state, made, value),
                    Upvalue::Shared { function: first, n: first_n } => {
                        self.push_function(state, made, *first);
                        upvalue_join(state, function, n, -1, *first_n);
                        lua_pop(state, 1);
                        continue;
                    }
                }
                // The dump has as many upvalues as were copied: the value
                // is popped. Were it not, it goes.
                if lua_setupvalue(state, function, n).is_null() {
                    lua_pop(state, 1);
                }
            }
        }
    }
}

/// Copy the `count` values from stack index `first` up with `copier`.
///
/// # Safety
/// As for `Values::copy`.
unsafe fn copy_list(
    copier: &mut Copier,
    state: *mut lua_State,
    first: c_int,
    count: c_int,
) -> Result<Vec<Value>, (usize, CrossError)> {
    let first = unsafe { lua_absindex(state, first) };
    (0..count.max(0))
        .map(|position| unsafe { copier.value(state, first + position, 0) }.map_err(|e| (position as usize, e)))
        .collect()
}

/// A task's error value, as it reaches the Lua thread: copied when it can
/// cross, else described (its `tostring`, or what says that failed).
pub enum ErrorValue {
    Copied(Values),
    Described(String),
}

impl ErrorValue {
    /// The error value at `index`.
    ///
    /// # Safety
    /// `state` is valid, on its thread.
    pub unsafe fn of(state: *mut lua_State, index: c_int) -> ErrorValue {
        match unsafe { Values::copy(state, index, 1) } {
            Ok(values) => ErrorValue::Copied(values),
            Err(_) => ErrorValue::Described(unsafe {
                tostring(state, index)
                    .unwrap_or_else(|| format!("(a {} value that tostring fails on)", type_name(state, index)))
            }),
        }
    }

    /// Push it: one value. As [`Values::push`], it may raise.
    ///
    /// # Safety
    /// As for [`Values::push`].
    pub unsafe fn push(&self, state: *mut lua_State) {
        unsafe {
            match self {
                ErrorValue::Copied(values) => {
                    values.push(state);
                }
                ErrorValue::Described(description) => push_str(state, description),
            }
        }
    }
}
