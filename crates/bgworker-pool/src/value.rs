//! Values that cross between Lua states by copy.
//!
//! `Values::copy` reads Lua values of one state into plain Rust data (no Lua
//! reference survives it, so the result is `Send`); `Values::rebuild` makes
//! them anew in another state. What crosses: nil, booleans, integers and
//! floats (kept apart where the Lua version has both), strings of any bytes,
//! and tables of those. A table reached twice in one copy (a shared
//! sub-table) is rebuilt once and reached twice, so sharing is kept; a table
//! that contains itself (a cycle) is refused, as are functions, userdata,
//! coroutines and LuaJIT cdata. Metatables do not cross: tables are read and
//! written raw.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;

use mlua::{Integer, Lua, Number, Table, Value as LuaValue};

/// Deepest table nesting that crosses: bounds the recursion of both copy and
/// rebuild, on threads whose stacks are of ordinary size.
pub const MAX_DEPTH: usize = 200;

enum Value {
    Nil,
    Boolean(bool),
    Integer(Integer),
    Number(Number),
    String(Box<[u8]>),
    /// An index into `Values::tables`.
    Table(usize),
}

/// Values copied out of a Lua state.
///
/// Invariant (built by `Copier` only): every `Value::Table(i)` indexes
/// `tables`, and a table never reaches itself, so `rebuild` terminates
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
    /// Lua itself failed while the table was read (out of memory).
    Lua(String),
}

impl fmt::Display for CrossError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.what {
            What::Type(what) => write!(f, "{what}")?,
            What::Key(what) => write!(f, "{what} used as a table key")?,
            What::Cycle => write!(f, "a table that contains itself")?,
            What::TooDeep => write!(f, "tables nested more than {MAX_DEPTH} deep")?,
            What::Lua(message) => write!(f, "a table that could not be read ({message})")?,
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

    /// The error happened inside the entry of key `key`. Too deep a
    /// nesting has no path: it would be `MAX_DEPTH` segments long.
    fn within(mut self, key: &LuaValue) -> Self {
        if !matches!(self.what, What::TooDeep) {
            self.path.push(segment(key));
        }
        self
    }
}

/// How a key shows in a path: `.name` for identifiers, `[...]` otherwise.
fn segment(key: &LuaValue) -> String {
    match key {
        LuaValue::String(s) => {
            let bytes = s.as_bytes();
            let identifier = !bytes.is_empty()
                && !bytes[0].is_ascii_digit()
                && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_');
            if identifier {
                format!(".{}", s.to_string_lossy())
            } else {
                format!("[{:?}]", s.to_string_lossy())
            }
        }
        LuaValue::Integer(i) => format!("[{i}]"),
        LuaValue::Number(n) => format!("[{n}]"),
        LuaValue::Boolean(b) => format!("[{b}]"),
        other => format!("[{}]", other.type_name()),
    }
}

/// The value as a phrase, for types that cannot cross.
fn refused(value: &LuaValue) -> &'static str {
    match value {
        LuaValue::Function(_) => "a function",
        LuaValue::Thread(_) => "a coroutine",
        LuaValue::UserData(_) => "a userdata",
        LuaValue::LightUserData(_) => "a light userdata",
        LuaValue::Error(_) => "an error object",
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
    fn value(&mut self, value: &LuaValue, depth: usize) -> Result<Value, CrossError> {
        Ok(match value {
            LuaValue::Nil => Value::Nil,
            LuaValue::Boolean(b) => Value::Boolean(*b),
            LuaValue::Integer(i) => Value::Integer(*i),
            LuaValue::Number(n) => Value::Number(*n),
            LuaValue::String(s) => Value::String(s.as_bytes().to_vec().into_boxed_slice()),
            LuaValue::Table(t) => Value::Table(self.table(t, depth)?),
            other => return Err(CrossError::new(What::Type(refused(other)))),
        })
    }

    fn table(&mut self, table: &Table, depth: usize) -> Result<usize, CrossError> {
        let address = table.to_pointer();
        match self.seen.get(&address) {
            Some(Some(index)) => return Ok(*index),
            Some(None) => return Err(CrossError::new(What::Cycle)),
            None => {}
        }
        if depth >= MAX_DEPTH {
            return Err(CrossError::new(What::TooDeep));
        }
        self.seen.insert(address, None);
        let mut entries = Vec::new();
        for pair in table.pairs::<LuaValue, LuaValue>() {
            let (key, value) = pair.map_err(|e| CrossError::new(What::Lua(e.to_string())))?;
            let copied_key = self.value(&key, depth + 1).map_err(|e| match e.what {
                What::Type(what) if e.path.is_empty() => CrossError::new(What::Key(what)),
                _ => e.within(&key),
            })?;
            let copied_value = self.value(&value, depth + 1).map_err(|e| e.within(&key))?;
            entries.push((copied_key, copied_value));
        }
        let index = self.tables.len();
        self.tables.push(entries);
        self.seen.insert(address, Some(index));
        Ok(index)
    }
}

impl Values {
    /// Copy `values`. On failure, the position (from 0) of the value that
    /// cannot cross, and why.
    pub fn copy<'a>(values: impl IntoIterator<Item = &'a LuaValue>) -> Result<Values, (usize, CrossError)> {
        let mut copier = Copier { tables: Vec::new(), seen: HashMap::new() };
        let list = values
            .into_iter()
            .enumerate()
            .map(|(position, value)| copier.value(value, 0).map_err(|e| (position, e)))
            .collect::<Result<_, _>>()?;
        Ok(Values { list, tables: copier.tables })
    }

    /// Make the values anew in `lua`.
    pub fn rebuild(&self, lua: &Lua) -> mlua::Result<Vec<LuaValue>> {
        let mut built = vec![None; self.tables.len()];
        self.list.iter().map(|value| self.value(lua, &mut built, value)).collect()
    }

    fn value(&self, lua: &Lua, built: &mut [Option<Table>], value: &Value) -> mlua::Result<LuaValue> {
        Ok(match value {
            Value::Nil => LuaValue::Nil,
            Value::Boolean(b) => LuaValue::Boolean(*b),
            Value::Integer(i) => LuaValue::Integer(*i),
            Value::Number(n) => LuaValue::Number(*n),
            Value::String(bytes) => LuaValue::String(lua.create_string(bytes)?),
            Value::Table(index) => LuaValue::Table(self.table(lua, built, *index)?),
        })
    }

    fn table(&self, lua: &Lua, built: &mut [Option<Table>], index: usize) -> mlua::Result<Table> {
        if let Some(table) = &built[index] {
            return Ok(table.clone());
        }
        let entries = &self.tables[index];
        let sequence = entries
            .iter()
            .filter(|(key, _)| matches!(key, Value::Integer(i) if *i >= 1 && *i as u64 <= entries.len() as u64))
            .count();
        let table = lua.create_table_with_capacity(sequence, entries.len() - sequence)?;
        for (key, value) in entries {
            table.raw_set(self.value(lua, built, key)?, self.value(lua, built, value)?)?;
        }
        built[index] = Some(table.clone());
        Ok(table)
    }
}

/// A task's error value, as it reaches the Lua thread: copied when it can
/// cross, else described (its `tostring`).
pub enum ErrorValue {
    Copied(Values),
    Described(String),
}

impl ErrorValue {
    pub fn of(error: &LuaValue) -> ErrorValue {
        match Values::copy([error]) {
            Ok(values) => ErrorValue::Copied(values),
            Err(_) => ErrorValue::Described(
                error.to_string().unwrap_or_else(|_| format!("(a {} error value)", error.type_name())),
            ),
        }
    }

    pub fn rebuild(&self, lua: &Lua) -> mlua::Result<LuaValue> {
        match self {
            ErrorValue::Copied(values) => Ok(values.rebuild(lua)?.pop().unwrap_or(LuaValue::Nil)),
            ErrorValue::Described(description) => Ok(LuaValue::String(lua.create_string(description)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evaluate `source` in a state, copy its values, close that state, and
    /// rebuild them in a new one: the new state and the values, or why the
    /// copy failed.
    fn cross(source: &str) -> Result<(Lua, Vec<LuaValue>), (usize, CrossError)> {
        let from = Lua::new();
        let values: Vec<LuaValue> = from.load(source).eval::<mlua::MultiValue>().unwrap().into_iter().collect();
        let copied = Values::copy(&values)?;
        drop(values);
        drop(from);
        let to = Lua::new();
        let rebuilt = copied.rebuild(&to).unwrap();
        Ok((to, rebuilt))
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
    }

    #[test]
    fn error_values_cross_when_they_can_else_their_description_does() {
        let from = Lua::new();
        let errors: Vec<LuaValue> = from
            .load("return {code = 42}, 'plain', setmetatable({}, {__tostring = function() return 'described' end}), print")
            .eval::<mlua::MultiValue>()
            .unwrap()
            .into_iter()
            .collect();
        let mut crossed: Vec<ErrorValue> = errors.iter().map(ErrorValue::of).collect();
        let function = crossed.pop().unwrap();
        assert!(matches!(&function, ErrorValue::Described(d) if d.starts_with("function: ")));
        drop((errors, from));
        let to = Lua::new();
        let rebuilt: Vec<LuaValue> = crossed.iter().map(|e| e.rebuild(&to).unwrap()).collect();
        let LuaValue::Table(table) = &rebuilt[0] else { panic!("a table crosses as a table") };
        assert_eq!(table.get::<i64>("code").unwrap(), 42);
        assert_eq!(rebuilt[1].to_string().unwrap(), "plain");
        // Copied raw: its metatable stays behind, so it arrives as a plain table.
        assert!(matches!(&rebuilt[2], LuaValue::Table(t) if t.metatable().is_none()));
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
}
