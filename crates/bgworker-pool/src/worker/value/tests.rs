//! Values across states: copied from one, closed, pushed in another.
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
            methods
                .add_meta_method(mlua::MetaMethod::ToString, |_, _, ()| Err::<String, _>(mlua::Error::runtime("no")));
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

/// Evaluate `source` in a state (a function, then its arguments), copy
/// them as a job's call is copied (the function by its dump), close that
/// state, and call the function in a new one, where `prelude` ran first:
/// the results, as strings, or why the copy failed.
fn call(prelude: &str, source: &str) -> Result<Vec<String>, (usize, String)> {
    let from = Lua::new();
    let values = from.load(source).eval::<MultiValue>().unwrap();
    let n = values.len() as c_int;
    let mut copied = None;
    // SAFETY: the function and its arguments are the top n of the stack.
    unsafe {
        from.exec_raw::<()>(values, |state| {
            let function = lua_gettop(state) - n + 1;
            let mut dump: Vec<u8> = Vec::new();
            lua_pushvalue(state, function);
            lua_dump(state, append, (&mut dump as *mut Vec<u8>).cast(), 0);
            lua_pop(state, 1);
            copied = Some(Values::copy_call(state, function, function + 1, n - 1).map(|args| (dump, args)));
        })
    }
    .unwrap();
    let (dump, args) = copied.unwrap().map_err(|(position, e)| (position, e.to_string()))?;
    drop(from);
    let to = Lua::new();
    to.load(prelude).exec().unwrap();
    // SAFETY: push_call pushes the function and its arguments, whose
    // results lua_call leaves for exec_raw to collect.
    let results: MultiValue = unsafe {
        to.exec_raw((), |state| {
            let count = args.push_call(state, |state| {
                luaL_loadbufferx(state, dump.as_ptr().cast(), dump.len(), c"=job".as_ptr(), ptr::null());
            });
            lua_call(state, count, LUA_MULTRET);
        })
    }
    .unwrap();
    Ok(results.into_iter().map(|v| v.to_string().unwrap()).collect())
}

fn called(source: &str) -> Vec<String> {
    call("", source).unwrap()
}

#[test]
fn a_closure_crosses_with_copies_of_its_upvalues() {
    let source = r#"local n, s, t = 6, "x", {k = {1, 2}}
                    return function(a) return n * a, s .. s, t.k[2], #t.k end, 7"#;
    assert_eq!(called(source), ["42", "xx", "2", "2"]);
    assert_eq!(called("return function() return 1 end"), ["1"], "no upvalue at all");
}

#[test]
fn functions_in_upvalues_cross_with_theirs() {
    let source = r#"local base = 10
                    local function add(x) return base + x end
                    local ops = {double = function(x) return add(x) * 2 end}
                    return function(x) return ops.double(x), add(x) end, 1"#;
    assert_eq!(called(source), ["22", "11"]);
    let recursive = r#"local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
                       local even, odd
                       function even(n) if n == 0 then return true end return odd(n - 1) end
                       function odd(n) if n == 0 then return false end return even(n - 1) end
                       return function() return fib(10), even(10), odd(7) end"#;
    assert_eq!(called(recursive), ["55", "true", "true"]);
    assert_eq!(called("local function f(n) if n == 0 then return 'end' end return f(n - 1) end return f, 3"), ["end"]);
}

#[test]
fn a_variable_that_closures_share_stays_shared() {
    // `t` holds `f`, whose `t` is the job's own: one variable, no copy of
    // the table within itself.
    let cycle = "local t = {} t.f = function() return t end return function() return t.f() == t end";
    assert_eq!(called(cycle), ["true"]);
    let source = r#"local n = 0
                    local function inc() n = n + 1 end
                    return function() inc() inc() return n end"#;
    // Lua 5.1 cannot tell a shared variable (the test build is 5.4).
    assert_eq!(called(source), ["2"]);
}

#[test]
fn tables_reached_by_upvalues_and_arguments_are_one() {
    let source = "local t = {} return function(a) return a == t, rawequal(t, a) end, t";
    assert_eq!(called(source), ["true", "true"]);
}

#[test]
fn the_global_table_is_the_receiving_states() {
    let source = r#"local G = _G
                    return function() return G.where, where, _ENV == G end"#;
    assert_eq!(call("where = 'worker'", source).unwrap(), ["worker", "worker", "true"]);
}

#[test]
fn upvalues_that_cannot_cross_are_named() {
    let refused = |source| call("", source).expect_err("the copy should fail");
    assert_eq!(refused("local f = io.stdout return function() return f end"), (0, "a userdata at upvalue 'f'".into()));
    assert_eq!(refused("local p = print return function() p() end"), (0, "a C function at upvalue 'p'".into()));
    assert_eq!(
        refused("local t = {} local c = {co = coroutine.create(print)} function t.f() return c end return function() return t end"),
        (0, "a coroutine at upvalue 't'.f, upvalue 'c'.co".into())
    );
    assert_eq!(
        refused("local function k(x) return function() return x end end local t = {} t.f = k(t) return function() return t end"),
        (0, "a table that contains itself at upvalue 't'.f, upvalue 'x'".into())
    );
    assert_eq!(refused("return function(x) return x end, print"), (1, "a function".into()), "not as an argument");
}
