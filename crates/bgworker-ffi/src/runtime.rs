//! Which runtime loaded the library: PUC Lua 5.1 or LuaJIT. Both speak the
//! Lua 5.1 API, so a library built for one loads in the other and runs,
//! until something that differs fails far away (a pool's workers without
//! LuaJIT's `bit` and `jit` modules, say). Each library asks at `luaopen`
//! and refuses the wrong runtime with a message that names the right
//! build.

use std::ffi::CStr;

use mlua::ffi::*;

/// What LuaJIT's `jit.version` starts with.
const LUAJIT: &[u8] = b"LuaJIT";

/// Why `module`, built for this crate's Lua feature, must not run in a
/// state that is (`in_luajit`) or is not LuaJIT; `None` when it may.
pub fn refusal(module: &str, in_luajit: bool) -> Option<String> {
    let built_for_luajit = cfg!(feature = "luajit");
    let built_for_lua51 = cfg!(feature = "lua51");
    if built_for_lua51 && in_luajit {
        Some(format!(
            "{module}: this build is for PUC Lua 5.1, but LuaJIT loaded it; install bgworker's \
             LuaJIT rock (the dist/jit folder of a release), or build bgworker for LuaJIT \
             (rockspec/luajit-config.lua)"
        ))
    } else if built_for_luajit && !in_luajit {
        Some(format!(
            "{module}: this build is for LuaJIT, but PUC Lua 5.1 loaded it; install bgworker's \
             Lua 5.1 rock (the dist/5.1 folder of a release), or build bgworker for Lua 5.1"
        ))
    } else {
        None
    }
}

/// Is the state LuaJIT? Its `jit` module, which LuaJIT loads with its
/// standard libraries, says so in `package.loaded.jit.version`. Leaves the
/// stack as it was.
///
/// # Safety
/// `state` is valid, on its thread, with three free stack slots.
pub unsafe fn is_luajit(state: *mut lua_State) -> bool {
    unsafe {
        lua_getfield(state, LUA_REGISTRYINDEX, c"_LOADED".as_ptr());
        let mut found = false;
        if lua_type(state, -1) == LUA_TTABLE {
            lua_getfield(state, -1, c"jit".as_ptr());
            if lua_type(state, -1) == LUA_TTABLE {
                lua_getfield(state, -1, c"version".as_ptr());
                if lua_type(state, -1) == LUA_TSTRING {
                    found = CStr::from_ptr(lua_tostring(state, -1)).to_bytes().starts_with(LUAJIT);
                }
                lua_pop(state, 1);
            }
            lua_pop(state, 1);
        }
        lua_pop(state, 1);
        found
    }
}

/// Why `module` refuses to open in `state` (see `refusal`), if it does.
///
/// # Safety
/// As for `is_luajit`.
pub unsafe fn check(state: *mut lua_State, module: &str) -> Option<String> {
    refusal(module, unsafe { is_luajit(state) })
}

/// The same for a library opened through mlua: an error that says why
/// `module` refuses to open in `lua`, if it does.
pub fn check_lua(lua: &mlua::Lua, module: &str) -> mlua::Result<()> {
    let loaded: mlua::Table = lua.named_registry_value("_LOADED")?;
    let version = match loaded.get::<Option<mlua::Table>>("jit")? {
        Some(jit) => jit.get::<Option<mlua::LuaString>>("version")?,
        None => None,
    };
    let in_luajit = version.is_some_and(|v| v.as_bytes().starts_with(LUAJIT));
    match refusal(module, in_luajit) {
        Some(message) => Err(mlua::Error::runtime(message)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_other_runtime_is_refused() {
        let refused_in_luajit = refusal("m", true);
        let refused_in_puc = refusal("m", false);
        if cfg!(feature = "lua51") {
            assert!(refused_in_luajit.unwrap().contains("LuaJIT loaded it"));
            assert!(refused_in_puc.is_none());
        } else if cfg!(feature = "luajit") {
            assert!(refused_in_puc.unwrap().contains("PUC Lua 5.1 loaded it"));
            assert!(refused_in_luajit.is_none());
        } else {
            assert!(refused_in_luajit.is_none() && refused_in_puc.is_none());
        }
    }
}
