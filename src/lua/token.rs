//! `core.token()` and `bgw_api.token_get`: the Lua side of cancellation
//! tokens (`crate::token`).
//!
//! A token is a userdata holding one counted reference; its `__gc` drops
//! it. The state's [`Scope`] lives in a userdata in the registry, so it is
//! collected only when the state closes: its `__gc` closes the scope, which
//! cancels every token of the state for the threads that still hold one.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;
use std::sync::Arc;

use bgworker_ffi::lua::{has_metatable, returned, type_name, LuaResult, Raise};
use mlua::ffi::*;

use crate::capi::{self, TokenRef};
use crate::token::{Scope, Token};

const TOKEN_METATABLE: &CStr = c"bgworker.core.Token";
const SCOPE_METATABLE: &CStr = c"bgworker.core.TokenScope";
/// Registry field holding the state's scope userdata.
const SCOPE_KEY: &CStr = c"bgworker.core.token_scope";

/// Both userdata blocks hold an `Option<Arc<_>>`: `None` once collected.
type TokenCell = Option<Arc<Token>>;
type ScopeCell = Option<Arc<Scope>>;

/// `__gc` of both userdata kinds: drop the reference; a scope closes first.
unsafe extern "C-unwind" fn token_gc(state: *mut lua_State) -> c_int {
    // SAFETY: only the __gc of token userdata, which hold a TokenCell.
    if let Some(cell) = unsafe { (lua_touserdata(state, 1) as *mut TokenCell).as_mut() } {
        drop(cell.take());
    }
    0
}

unsafe extern "C-unwind" fn scope_gc(state: *mut lua_State) -> c_int {
    // SAFETY: only the __gc of the scope userdata, which holds a ScopeCell.
    if let Some(cell) = unsafe { (lua_touserdata(state, 1) as *mut ScopeCell).as_mut() } {
        if let Some(scope) = cell.take() {
            scope.close();
        }
    }
    0
}

/// The state's scope, made on first use. It may raise (out of memory)
/// and owns nothing meanwhile: the scope is written into its userdata.
///
/// # Safety
/// `state` is valid, on its thread.
unsafe fn scope<'a>(state: *mut lua_State) -> &'a Arc<Scope> {
    unsafe {
        lua_getfield(state, LUA_REGISTRYINDEX, SCOPE_KEY.as_ptr());
        let mut cell = lua_touserdata(state, -1) as *mut ScopeCell;
        lua_pop(state, 1);
        if cell.is_null() {
            if luaL_newmetatable(state, SCOPE_METATABLE.as_ptr()) != 0 {
                lua_pushcfunction(state, scope_gc);
                lua_setfield(state, -2, c"__gc".as_ptr());
            }
            cell = lua_newuserdata(state, std::mem::size_of::<ScopeCell>()) as *mut ScopeCell;
            ptr::write(cell, Some(Arc::new(Scope::default())));
            lua_insert(state, -2);
            lua_setmetatable(state, -2);
            lua_setfield(state, LUA_REGISTRYINDEX, SCOPE_KEY.as_ptr());
        }
        // SAFETY: the scope is taken only by its __gc, when the state closes.
        (*cell).as_ref().expect("a live state's token scope is open")
    }
}

/// The token held by the userdata at `index`, if it is one of ours.
///
/// # Safety
/// `state` is valid, with two free stack slots.
unsafe fn token_at<'a>(state: *mut lua_State, index: c_int) -> Option<&'a Arc<Token>> {
    unsafe {
        let cell = lua_touserdata(state, index) as *mut TokenCell;
        if cell.is_null() || !has_metatable(state, index, TOKEN_METATABLE) {
            return None;
        }
        // SAFETY: a userdata with our metatable holds a TokenCell.
        (*cell).as_ref()
    }
}

/// `core.token()`: a new token, with `:cancel()` and `:cancelled()`.
///
/// # Safety
/// Called by Lua.
pub unsafe fn token(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        // Everything that may raise comes before the token exists: then the
        // userdata's block owns it at once, and its metatable frees it.
        if luaL_newmetatable(state, TOKEN_METATABLE.as_ptr()) != 0 {
            let methods: [(&CStr, lua_CFunction); 2] = [(c"cancel", token_cancel), (c"cancelled", token_cancelled)];
            lua_createtable(state, 0, methods.len() as c_int);
            for (name, method) in methods {
                lua_pushcfunction(state, method);
                lua_setfield(state, -2, name.as_ptr());
            }
            lua_setfield(state, -2, c"__index".as_ptr());
            lua_pushcfunction(state, token_gc);
            lua_setfield(state, -2, c"__gc".as_ptr());
        }
        let scope = scope(state);
        let cell = lua_newuserdata(state, std::mem::size_of::<TokenCell>()) as *mut TokenCell;
        ptr::write(cell, Some(Arc::new(Token::new(scope))));
        lua_insert(state, -2);
        lua_setmetatable(state, -2);
    }
    Ok(1)
}

/// The token that is `self` of method `name`.
///
/// # Safety
/// Called by Lua.
unsafe fn this<'a>(state: *mut lua_State, name: &str) -> LuaResult<&'a Arc<Token>> {
    unsafe {
        token_at(state, 1).ok_or_else(|| {
            Raise::Arg(1, format!("token expected, got {}; call it as token:{name}()", type_name(state, 1)))
        })
    }
}

/// Push a boolean from `method`, or raise its error.
///
/// # Safety
/// Called by Lua.
unsafe fn boolean_method(state: *mut lua_State, method: unsafe fn(*mut lua_State) -> LuaResult<bool>) -> c_int {
    unsafe {
        let pushed = method(state).map(|value| {
            lua_pushboolean(state, value as c_int);
            1
        });
        returned(state, pushed)
    }
}

/// `token:cancel()`: true the first time.
unsafe extern "C-unwind" fn token_cancel(state: *mut lua_State) -> c_int {
    unsafe { boolean_method(state, |state| Ok(this(state, "cancel")?.cancel())) }
}

/// `token:cancelled()`.
unsafe extern "C-unwind" fn token_cancelled(state: *mut lua_State) -> c_int {
    unsafe { boolean_method(state, |state| Ok(this(state, "cancelled")?.is_cancelled())) }
}

/// `bgw_api.token_get`: a new reference to the token at `index`, or NULL.
/// Never raises.
pub unsafe extern "C-unwind" fn token_get(state: *mut c_void, index: c_int) -> *mut TokenRef {
    let state = state as *mut lua_State;
    unsafe {
        if state.is_null() || lua_checkstack(state, 2) == 0 {
            return ptr::null_mut();
        }
        let index = lua_absindex(state, index);
        token_at(state, index).map_or(ptr::null_mut(), capi::new_token_ref)
    }
}
