//! Values that cross between Lua states by copy.
//!
//! `Values::copy` reads Lua values off a state's stack into plain Rust data
//! (no Lua reference survives it, so the result is `Send`);
//! `Values::push` makes them anew on another state's stack. Both use Lua's
//! C API: they are on the hot path of every job. Which values cross is
//! stated once, for users, in docs/jobs.md ("A job's function and its
//! values"); this module implements it. A table reached twice in one copy
//! is made once and reached twice (a `HashMap` of the tables seen), a
//! cycle is refused, and tables are read and written raw, so metatables
//! stay behind.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::fmt;
use std::ptr;

use bgworker_ffi::lua::{bytes_at, push_str, tostring, type_name};
use mlua::ffi::*;

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

enum Value {
    Nil,
    Boolean(bool),
    Integer(lua_Integer),
    Number(lua_Number),
    String(Box<[u8]>),
    /// An index into `Values::tables`.
    Table(usize),
}

/// Values copied out of a Lua state.
///
/// Invariant (built by `Copier` only): every `Value::Table(i)` indexes
/// `tables`, and a table never reaches itself, so `push` terminates
/// within `MAX_DEPTH` levels.
#[derive(Default)]
pub struct Values {
    list: Vec<Value>,
    tables: Vec<Vec<(Value, Value)>>,
}

/// Why a value cannot cross, and where it sits inside its top-level value.
#[derive(Debug)]
pub struct CrossError {
    what: What,
    /// Path segments from the value that failed outwards, such as `[2]`, `.name`.
    path: Vec<String>,
}

#[derive(Debug)]
enum What {
    /// A value of a type that cannot cross, described with its article.
    Type(&'static str),
    /// The same, used as a table key.
    Key(&'static str),
    Cycle,
    TooDeep,
}

impl fmt::Display for CrossError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.what {
            What::Type(what) => write!(f, "{what}")?,
            What::Key(what) => write!(f, "{what} used as a table key")?,
            What::Cycle => write!(f, "a table that contains itself")?,
            What::TooDeep => write!(f, "tables nested more than {MAX_DEPTH} deep")?,
        }
        if !self.path.is_empty() {
            write!(f, " at ")?;
            for segment in self.path.iter().rev() {
                write!(f, "{segment}")?;
            }
        }
        Ok(())
    }
}

impl CrossError {
    fn new(what: What) -> Self {
        CrossError { what, path: Vec::new() }
    }

    /// The error happened inside the entry whose key is `segment`. Too
    /// deep a nesting has no path: it would be `MAX_DEPTH` segments long.
    fn within(mut self, segment: String) -> Self {
        if !matches!(self.what, What::TooDeep) {
            self.path.push(segment);
        }
        self
    }
}

/// How the key at `index` shows in a path: `.name` for identifiers,
/// `[...]` otherwise.
///
/// # Safety
/// `state` is valid.
unsafe fn segment(state: *mut lua_State, index: c_int) -> String {
    unsafe {
        match lua_type(state, index) {
            LUA_TSTRING => {
                let bytes = bytes_at(state, index).unwrap_or_default();
                let identifier = !bytes.is_empty()
                    && !bytes[0].is_ascii_digit()
                    && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_');
                let text = String::from_utf8_lossy(bytes);
                if identifier {
                    format!(".{text}")
                } else {
                    format!("[{text:?}]")
                }
            }
            LUA_TNUMBER if lua_isinteger(state, index) != 0 => format!("[{}]", lua_tointeger(state, index)),
            LUA_TNUMBER => format!("[{}]", lua_tonumber(state, index)),
            LUA_TBOOLEAN => format!("[{}]", lua_toboolean(state, index) != 0),
            _ => format!("[{}]", type_name(state, index)),
        }
    }
}

/// The value's type as a phrase, for types that cannot cross.
fn refused(kind: c_int) -> &'static str {
    match kind {
        LUA_TFUNCTION => "a function",
        LUA_TTHREAD => "a coroutine",
        LUA_TUSERDATA => "a userdata",
        LUA_TLIGHTUSERDATA => "a light userdata",
        _ => "a value of a foreign type (cdata)",
    }
}

struct Copier {
    tables: Vec<Vec<(Value, Value)>>,
    /// Tables met so far, by address: `None` while their entries are being
    /// copied (meeting one then is a cycle), then their index.
    seen: HashMap<*const c_void, Option<usize>>,
}

impl Copier {
    /// # Safety
    /// `state` is valid; `index` is absolute.
    unsafe fn value(&mut self, state: *mut lua_State, index: c_int, depth: usize) -> Result<Value, CrossError> {
        unsafe {
            Ok(match lua_type(state, index) {
                LUA_TNIL => Value::Nil,
                LUA_TBOOLEAN => Value::Boolean(lua_toboolean(state, index) != 0),
                LUA_TNUMBER if lua_isinteger(state, index) != 0 => Value::Integer(lua_tointeger(state, index)),
                LUA_TNUMBER => Value::Number(lua_tonumber(state, index)),
                LUA_TSTRING => Value::String(bytes_at(state, index).unwrap_or_default().into()),
                LUA_TTABLE => Value::Table(self.table(state, index, depth)?),
                kind => return Err(CrossError::new(What::Type(refused(kind)))),
            })
        }
    }

    /// # Safety
    /// As for `value`.
    unsafe fn table(&mut self, state: *mut lua_State, index: c_int, depth: usize) -> Result<usize, CrossError> {
        unsafe {
            let address = lua_topointer(state, index);
            match self.seen.get(&address) {
                Some(Some(table)) => return Ok(*table),
                Some(None) => return Err(CrossError::new(What::Cycle)),
                None => {}
            }
            // Each level holds a key and a value on the stack.
            if depth >= MAX_DEPTH || lua_checkstack(state, 3) == 0 {
                return Err(CrossError::new(What::TooDeep));
            }
            self.seen.insert(address, None);
            let mut entries = Vec::new();
            lua_pushnil(state);
            while lua_next(state, index) != 0 {
                let (key, value) = (lua_gettop(state) - 1, lua_gettop(state));
                let entry = match self.value(state, key, depth + 1) {
                    Err(CrossError { what: What::Type(what), path }) if path.is_empty() => {
                        Err(CrossError::new(What::Key(what)))
                    }
                    Err(e) => Err(e.within(segment(state, key))),
                    Ok(copied_key) => match self.value(state, value, depth + 1) {
                        Ok(copied_value) => Ok((copied_key, copied_value)),
                        Err(e) => Err(e.within(segment(state, key))),
                    },
                };
                // The value goes; the key stays for lua_next, or goes too.
                match entry {
                    Ok(entry) => {
                        entries.push(entry);
                        lua_pop(state, 1);
                    }
                    Err(e) => {
                        lua_pop(state, 2);
                        return Err(e);
                    }
                }
            }
            let table = self.tables.len();
            self.tables.push(entries);
            self.seen.insert(address, Some(table));
            Ok(table)
        }
    }
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
        let mut copier = Copier { tables: Vec::new(), seen: HashMap::new() };
        let first = unsafe { lua_absindex(state, first) };
        let list = (0..count.max(0))
            .map(|position| unsafe { copier.value(state, first + position, 0) }.map_err(|e| (position as usize, e)))
            .collect::<Result<_, _>>()?;
        Ok(Values { list, tables: copier.tables })
    }

    /// Push the values onto `state`'s stack; returns how many. It may raise
    /// (out of memory, or no stack space), and borrows only: call it where
    /// raising is allowed (`bgworker_ffi::lua::protect`, or a decode).
    ///
    /// # Safety
    /// `state` is valid, on its thread.
    pub unsafe fn push(&self, state: *mut lua_State) -> c_int {
        unsafe {
            luaL_checkstack(state, self.list.len() as c_int + 2, ptr::null());
            self.with_made(state, |made| {
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

    /// Run `body` with the table of the tables made so far (by index + 1,
    /// so that a shared one is made once) at stack index `made` (0 when
    /// the values hold no table), then remove it. On the stack: nothing
    /// Rust owns while Lua may raise.
    ///
    /// # Safety
    /// As for `push`, with a free stack slot.
    unsafe fn with_made(&self, state: *mut lua_State, body: impl FnOnce(c_int)) {
        unsafe {
            let made = match self.tables.len() {
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

    /// # Safety
    /// As for `push`; `made` is its table of made tables.
    unsafe fn push_value(&self, state: *mut lua_State, made: c_int, value: &Value) {
        unsafe {
            match value {
                Value::Nil => lua_pushnil(state),
                Value::Boolean(b) => lua_pushboolean(state, *b as c_int),
                Value::Integer(i) => lua_pushinteger(state, *i),
                Value::Number(n) => lua_pushnumber(state, *n),
                Value::String(bytes) => push_str(state, bytes),
                Value::Table(index) => self.push_table(state, made, *index),
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

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::{Lua, MultiValue, Value as LuaValue};

    /// Copy `values` off `lua`'s stack.
    fn copy(lua: &Lua, values: MultiValue) -> Result<Values, (usize, CrossError)> {
        let n = values.len() as c_int;
        let mut copied = None;
        // SAFETY: the values are the top n of the stack.
        unsafe { lua.exec_raw::<()>(values, |state| copied = Some(Values::copy(state, lua_gettop(state) - n + 1, n))) }
            .unwrap();
        copied.unwrap()
    }

    /// Evaluate `source` in a state, copy its values, close that state, and
    /// push them in a new one: the new state and the values, or why the
    /// copy failed.
    fn cross(source: &str) -> Result<(Lua, Vec<LuaValue>), (usize, CrossError)> {
        let from = Lua::new();
        let values = from.load(source).eval::<MultiValue>().unwrap();
        let copied = copy(&from, values)?;
        drop(from);
        let to = Lua::new();
        // SAFETY: push leaves its values for exec_raw to collect.
        let pushed: MultiValue = unsafe {
            to.exec_raw((), |state| {
                copied.push(state);
            })
        }
        .unwrap();
        Ok((to, pushed.into_iter().collect()))
    }

    fn error(source: &str) -> (usize, String) {
        let (position, e) = cross(source).expect_err("the copy should fail");
        (position, e.to_string())
    }

    #[test]
    fn scalars_keep_their_type_and_bits() {
        let (_lua, v) = cross(r#"return nil, true, 7, 7.0, -0.0, 0/0, "a\0b""#).unwrap();
        assert!(matches!(v[0], LuaValue::Nil));
        assert!(matches!(v[1], LuaValue::Boolean(true)));
        assert!(matches!(v[2], LuaValue::Integer(7)));
        assert!(matches!(v[3], LuaValue::Number(n) if n == 7.0));
        assert!(matches!(v[4], LuaValue::Number(n) if n.to_bits() == (-0.0f64).to_bits()));
        assert!(matches!(v[5], LuaValue::Number(n) if n.is_nan()));
        assert!(matches!(&v[6], LuaValue::String(s) if &*s.as_bytes() == b"a\0b"));
        assert!(cross("return").unwrap().1.is_empty());
    }

    #[test]
    fn error_values_cross_when_they_can_else_their_description_does() {
        let from = Lua::new();
        let source = "return {code = 42}, 'plain', setmetatable({}, {__index = print}), print, \
                      setmetatable({}, {__tostring = function() error('no') end})";
        let errors = from.load(source).eval::<MultiValue>().unwrap();
        let n = errors.len() as c_int;
        let mut crossed = Vec::new();
        // SAFETY: the errors are the top n of the stack.
        unsafe {
            from.exec_raw::<()>(errors, |state| {
                let first = lua_gettop(state) - n + 1;
                crossed = (first..first + n).map(|index| ErrorValue::of(state, index)).collect();
            })
        }
        .unwrap();
        drop(from);
        assert!(matches!(&crossed[3], ErrorValue::Described(d) if d.starts_with("function: ")));
        assert!(matches!(&crossed[4], ErrorValue::Copied(_)), "a table crosses raw, whatever its metatable");
        let to = Lua::new();
        // SAFETY: each push leaves one value for exec_raw to collect.
        let pushed: MultiValue =
            unsafe { to.exec_raw((), |state| crossed[..3].iter().for_each(|e| e.push(state))) }.unwrap();
        let pushed: Vec<LuaValue> = pushed.into_iter().collect();
        let LuaValue::Table(table) = &pushed[0] else { panic!("a table crosses as a table") };
        assert_eq!(table.get::<i64>("code").unwrap(), 42);
        assert_eq!(pushed[1].to_string().unwrap(), "plain");
        assert!(matches!(&pushed[2], LuaValue::Table(t) if t.metatable().is_none()));
    }

    #[test]
    fn a_description_that_fails_says_so() {
        struct Failing;
        impl mlua::UserData for Failing {
            fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
                methods.add_meta_method(mlua::MetaMethod::ToString, |_, _, ()| {
                    Err::<String, _>(mlua::Error::runtime("no"))
                });
            }
        }
        let lua = Lua::new();
        let value = LuaValue::UserData(lua.create_userdata(Failing).unwrap());
        let mut error = None;
        // SAFETY: the value is on top of the stack.
        unsafe { lua.exec_raw::<()>(value, |state| error = Some(ErrorValue::of(state, -1))) }.unwrap();
        assert!(matches!(error, Some(ErrorValue::Described(d)) if d == "(a userdata value that tostring fails on)"));
    }

    #[test]
    fn shared_tables_stay_shared() {
        let (to, v) = cross("local s = {1} return {s, s, {s}}, s").unwrap();
        to.globals().set("t", v[0].clone()).unwrap();
        to.globals().set("s", v[1].clone()).unwrap();
        assert!(to.load("return t[1] == t[2] and t[3][1] == s and t[1] == s").eval::<bool>().unwrap());
    }

    #[test]
    fn refusals_say_what_and_where() {
        assert_eq!(error("return 1, {a = {print}}"), (1, "a function at .a[1]".into()));
        assert_eq!(error("local t = {} t.x = {t} return t"), (0, "a table that contains itself at .x[1]".into()));
        assert_eq!(error("return {[print] = 1}"), (0, "a function used as a table key".into()));
        assert_eq!(error("return coroutine.create(print)"), (0, "a coroutine".into()));
        assert_eq!(error(r#"return {["a b"] = {[2.5] = io.stdout}}"#), (0, r#"a userdata at ["a b"][2.5]"#.into()));
        // `levels` tables, each in the next.
        let nested = |levels: usize| format!("local t = {{}} for _ = 2, {levels} do t = {{t}} end return t");
        assert!(cross(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(error(&nested(MAX_DEPTH + 1)), (0, "tables nested more than 200 deep".into()));
    }

    #[test]
    fn a_failed_copy_leaves_the_stack_as_it_was() {
        let lua = Lua::new();
        let values = lua.load("return {1, {2, {print}}}, 5").eval::<MultiValue>().unwrap();
        let mut tops = (0, 0);
        // SAFETY: the values are the top two of the stack.
        unsafe {
            lua.exec_raw::<()>(values, |state| {
                let before = lua_gettop(state);
                assert!(Values::copy(state, before - 1, 2).is_err());
                tops = (before, lua_gettop(state));
            })
        }
        .unwrap();
        assert_eq!(tops.0, tops.1);
    }
}
