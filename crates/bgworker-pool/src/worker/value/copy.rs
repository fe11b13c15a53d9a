//! Reading Lua values off a stack into [`Values`]: which values cross,
//! how shared ones stay shared, and why one cannot cross.
//!
//! - A table reached twice in one copy is copied once (`seen`, by
//!   address). A table reached again while its own entries are being
//!   copied is a cycle: refused, since `push` makes a table after its
//!   entries.
//! - A Lua function crosses only as an upvalue (of a job's function, or of
//!   a function or table that one reaches): by its dump, with its upvalues
//!   copied in turn. It is made before its upvalues are set, so a function
//!   may reach itself (a recursive local function, functions that call
//!   each other); a cycle through a table stays refused, as above. Two
//!   functions that share a local variable share it again after the copy
//!   (`cells`; Lua 5.2 and later, and LuaJIT).
//! - An upvalue that holds the global table (`_ENV`, `local G = _G`) is
//!   not copied: it becomes the receiving state's global table.
//!
//! Copying only reads (it never raises), and leaves the stack as it was,
//! also when it fails.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::fmt;

use bgworker_ffi::lua::{bytes_at, type_name, upvalue_id};
use mlua::ffi::*;

use super::{Function, Upvalue, Value, Values, LOAD_SETS_FIRST_UPVALUE, MAX_DEPTH};

/// Why a value cannot cross, and where it sits inside its top-level value.
#[derive(Debug)]
pub struct CrossError {
    what: What,
    /// Path segments from the value that failed outwards.
    path: Vec<Segment>,
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

#[derive(Debug)]
enum Segment {
    /// A table's entry, by its key: `.name` or `[...]`.
    Key(String),
    /// A function's upvalue, by its name.
    Upvalue(String),
}

impl fmt::Display for CrossError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.what {
            What::Type(what) => write!(f, "{what}")?,
            What::Key(what) => write!(f, "{what} used as a table key")?,
            What::Cycle => write!(f, "a table that contains itself")?,
            What::TooDeep => write!(f, "tables nested more than {MAX_DEPTH} deep")?,
        }
        for (n, segment) in self.path.iter().rev().enumerate() {
            match (n, segment) {
                (0, _) => write!(f, " at ")?,
                (_, Segment::Upvalue(_)) => write!(f, ", ")?,
                _ => {}
            }
            match segment {
                Segment::Key(key) => write!(f, "{key}")?,
                Segment::Upvalue(name) => write!(f, "upvalue '{name}'")?,
            }
        }
        Ok(())
    }
}

impl CrossError {
    fn new(what: What) -> Self {
        CrossError { what, path: Vec::new() }
    }

    /// The error happened inside `segment`. Too deep a nesting has no
    /// path: it would be `MAX_DEPTH` segments long.
    fn within(mut self, segment: Segment) -> Self {
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
unsafe fn key_segment(state: *mut lua_State, index: c_int) -> Segment {
    let text = unsafe {
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
    };
    Segment::Key(text)
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

/// A table or function met so far in one copy.
enum Seen {
    /// A table whose entries are being copied.
    OpenTable,
    Table(usize),
    /// A function whose upvalues are being copied, and how many tables
    /// were open when that began: met again with more open, the way back
    /// to it passes through a table.
    OpenFunction {
        index: usize,
        open_tables: usize,
    },
    Function(usize),
}

pub(super) struct Copier {
    tables: Vec<Vec<(Value, Value)>>,
    functions: Vec<Function>,
    seen: HashMap<*const c_void, Seen>,
    open_tables: usize,
    /// Whether a Lua function may cross: only in upvalues.
    in_upvalue: bool,
    /// The variables of the upvalues copied so far: the function and
    /// upvalue number where each was met first.
    cells: HashMap<*const c_void, (usize, c_int)>,
    /// The copying state's global table, once it was looked up.
    globals: Option<*const c_void>,
    /// A dump, kept from function to function.
    dump: Vec<u8>,
}

impl Copier {
    pub(super) fn new() -> Copier {
        Copier {
            tables: Vec::new(),
            functions: Vec::new(),
            seen: HashMap::new(),
            open_tables: 0,
            in_upvalue: false,
            cells: HashMap::new(),
            globals: None,
            dump: Vec::new(),
        }
    }

    /// The values copied, as `list`, after `callee`'s upvalues.
    pub(super) fn finish(self, list: Vec<Value>, callee: Option<usize>) -> Values {
        Values { list, tables: self.tables, functions: self.functions, callee }
    }

    /// # Safety
    /// `state` is valid; `index` is absolute.
    pub(super) unsafe fn value(
        &mut self,
        state: *mut lua_State,
        index: c_int,
        depth: usize,
    ) -> Result<Value, CrossError> {
        unsafe {
            Ok(match lua_type(state, index) {
                LUA_TNIL => Value::Nil,
                LUA_TBOOLEAN => Value::Boolean(lua_toboolean(state, index) != 0),
                LUA_TNUMBER if lua_isinteger(state, index) != 0 => Value::Integer(lua_tointeger(state, index)),
                LUA_TNUMBER => Value::Number(lua_tonumber(state, index)),
                LUA_TSTRING => Value::String(bytes_at(state, index).unwrap_or_default().into()),
                LUA_TTABLE => Value::Table(self.table(state, index, depth)?),
                LUA_TFUNCTION if self.in_upvalue => Value::Function(self.function(state, index, depth)?),
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
                Some(Seen::Table(table)) => return Ok(*table),
                Some(_) => return Err(CrossError::new(What::Cycle)),
                None => {}
            }
            // Each level holds a key and a value on the stack.
            if depth >= MAX_DEPTH || lua_checkstack(state, 3) == 0 {
                return Err(CrossError::new(What::TooDeep));
            }
            self.seen.insert(address, Seen::OpenTable);
            self.open_tables += 1;
            let mut entries = Vec::new();
            lua_pushnil(state);
            while lua_next(state, index) != 0 {
                let (key, value) = (lua_gettop(state) - 1, lua_gettop(state));
                let entry = match self.value(state, key, depth + 1) {
                    Err(CrossError { what: What::Type(what), path }) if path.is_empty() => {
                        Err(CrossError::new(What::Key(what)))
                    }
                    Err(e) => Err(e.within(key_segment(state, key))),
                    Ok(copied_key) => match self.value(state, value, depth + 1) {
                        Ok(copied_value) => Ok((copied_key, copied_value)),
                        Err(e) => Err(e.within(key_segment(state, key))),
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
            self.open_tables -= 1;
            let table = self.tables.len();
            self.tables.push(entries);
            self.seen.insert(address, Seen::Table(table));
            Ok(table)
        }
    }

    /// # Safety
    /// As for `value`, with a function at `index`.
    unsafe fn function(&mut self, state: *mut lua_State, index: c_int, depth: usize) -> Result<usize, CrossError> {
        unsafe {
            let address = lua_topointer(state, index);
            match self.seen.get(&address) {
                Some(Seen::Function(index)) => return Ok(*index),
                Some(Seen::OpenFunction { index, open_tables }) if *open_tables == self.open_tables => {
                    return Ok(*index)
                }
                Some(_) => return Err(CrossError::new(What::Cycle)),
                None => {}
            }
            if lua_iscfunction(state, index) != 0 {
                return Err(CrossError::new(What::Type("a C function")));
            }
            // An upvalue's value, then the global table to compare with.
            if depth >= MAX_DEPTH || lua_checkstack(state, 2) == 0 {
                return Err(CrossError::new(What::TooDeep));
            }
            self.dump.clear();
            lua_pushvalue(state, index);
            let dumped = lua_dump(state, append, (&mut self.dump as *mut Vec<u8>).cast(), 0);
            lua_pop(state, 1);
            if dumped != 0 {
                return Err(CrossError::new(What::Type("a function that cannot be dumped")));
            }
            let function = self.functions.len();
            self.functions.push(Function { code: self.dump.as_slice().into(), upvalues: Vec::new() });
            self.seen.insert(address, Seen::OpenFunction { index: function, open_tables: self.open_tables });
            self.functions[function].upvalues = self.upvalues(state, index, function, depth + 1)?;
            self.seen.insert(address, Seen::Function(function));
            Ok(function)
        }
    }

    /// The job's own function, at `index`, as the first of the functions:
    /// its upvalues, when some must be set in the worker (its code is left
    /// empty: the worker has it, as the job's `Func`). `None` when none
    /// must: it has none, or only the global table where `load` sets it.
    ///
    /// # Safety
    /// As for `value`; nothing was copied yet.
    pub(super) unsafe fn callee(&mut self, state: *mut lua_State, index: c_int) -> Result<Option<usize>, CrossError> {
        unsafe {
            if lua_type(state, index) != LUA_TFUNCTION || lua_iscfunction(state, index) != 0 {
                return Ok(None);
            }
            if lua_checkstack(state, 2) == 0 {
                return Err(CrossError::new(What::TooDeep));
            }
            if !self.sets_upvalues(state, index) {
                return Ok(None);
            }
            let address = lua_topointer(state, index);
            self.functions.push(Function { code: Box::default(), upvalues: Vec::new() });
            self.seen.insert(address, Seen::OpenFunction { index: 0, open_tables: 0 });
            self.functions[0].upvalues = self.upvalues(state, index, 0, 1)?;
            self.seen.insert(address, Seen::Function(0));
            Ok(Some(0))
        }
    }

    /// Whether the function at `index` needs upvalues set after its load:
    /// one other than the global table as the first (which `load` sets on
    /// Lua 5.2 and later).
    ///
    /// # Safety
    /// As for `value`, with a Lua function at `index` and two free stack
    /// slots.
    unsafe fn sets_upvalues(&mut self, state: *mut lua_State, index: c_int) -> bool {
        let mut n = 1;
        loop {
            let name = unsafe { lua_getupvalue(state, index, n) };
            if name.is_null() {
                return false;
            }
            let globals = unsafe { CStr::from_ptr(name) == c"_ENV" || self.is_globals(state) };
            unsafe { lua_pop(state, 1) };
            if !(n == 1 && globals && LOAD_SETS_FIRST_UPVALUE) {
                return true;
            }
            n += 1;
        }
    }

    /// The upvalues of the Lua function at `index`, number `function`
    /// among the copied functions.
    ///
    /// # Safety
    /// As for `value`, with a Lua function at `index` and two free stack
    /// slots.
    unsafe fn upvalues(
        &mut self,
        state: *mut lua_State,
        index: c_int,
        function: usize,
        depth: usize,
    ) -> Result<Vec<Upvalue>, CrossError> {
        let in_upvalue = std::mem::replace(&mut self.in_upvalue, true);
        let mut upvalues = Vec::new();
        let mut n = 1;
        let result = loop {
            let name = unsafe { lua_getupvalue(state, index, n) };
            if name.is_null() {
                break Ok(upvalues);
            }
            let name = unsafe { CStr::from_ptr(name) };
            let upvalue = unsafe { self.upvalue(state, index, n, function, name, depth) };
            unsafe { lua_pop(state, 1) };
            match upvalue {
                Ok(upvalue) => upvalues.push(upvalue),
                Err(e) => break Err(e.within(Segment::Upvalue(name.to_string_lossy().into_owned()))),
            }
            n += 1;
        };
        self.in_upvalue = in_upvalue;
        result
    }

    /// Upvalue `n`, on top of the stack, of the function at `index`.
    ///
    /// # Safety
    /// As for `upvalues`, with one free stack slot.
    unsafe fn upvalue(
        &mut self,
        state: *mut lua_State,
        index: c_int,
        n: c_int,
        function: usize,
        name: &CStr,
        depth: usize,
    ) -> Result<Upvalue, CrossError> {
        unsafe {
            if name == c"_ENV" || self.is_globals(state) {
                return Ok(Upvalue::Globals);
            }
            if let Some(cell) = upvalue_id(state, index, n) {
                if let Some(&(first, first_n)) = self.cells.get(&cell) {
                    return Ok(Upvalue::Shared { function: first, n: first_n });
                }
                self.cells.insert(cell, (function, n));
            }
            let value = lua_gettop(state);
            Ok(Upvalue::Value(self.value(state, value, depth)?))
        }
    }

    /// Whether the value on top of the stack is the state's global table.
    ///
    /// # Safety
    /// As for `value`, with one free stack slot.
    unsafe fn is_globals(&mut self, state: *mut lua_State) -> bool {
        unsafe {
            let globals = *self.globals.get_or_insert_with(|| {
                lua_pushglobaltable(state);
                let globals = lua_topointer(state, -1);
                lua_pop(state, 1);
                globals
            });
            lua_type(state, -1) == LUA_TTABLE && lua_topointer(state, -1) == globals
        }
    }
}

/// `lua_dump`'s writer: append to the `Vec<u8>` at `data`.
pub(crate) unsafe extern "C-unwind" fn append(
    _: *mut lua_State,
    bytes: *const c_void,
    len: usize,
    data: *mut c_void,
) -> c_int {
    if len > 0 {
        // SAFETY: `data` is a `Vec<u8>` its caller passed, `bytes` Lua's `len` bytes.
        unsafe { (*data.cast::<Vec<u8>>()).extend_from_slice(std::slice::from_raw_parts(bytes.cast(), len)) };
    }
    0
}
