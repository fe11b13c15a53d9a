//! The C contract of `include/bgworker.h`, mirrored member for member.
//!
//! This is the only thing shared with bgworker: a utility library never links
//! against it, so no Rust type crosses the boundary, only these C layouts
//! and function pointers.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::mem::size_of;
use std::sync::Once;

use mlua::ffi::{lua_State, lua_getfield, lua_pop, lua_touserdata, lua_type, LUA_REGISTRYINDEX, LUA_TLIGHTUSERDATA};

/// `BGW_REGISTRY_KEY`.
const REGISTRY_KEY: &CStr = c"bgworker.api";
/// `BGW_API_VERSION`: the major version this crate speaks.
const API_VERSION: c_uint = 1;

/// `BGW_NOWAIT` and `BGW_FOREVER`.
pub const NOWAIT: c_int = 0;
pub const FOREVER: c_int = -1;

/// `bgw_handle`: opaque.
#[repr(C)]
pub struct Handle {
    _opaque: [u8; 0],
}

/// `bgw_token`: opaque.
#[repr(C)]
pub struct TokenRef {
    _opaque: [u8; 0],
}

/// `bgw_decode_fn`. Lua errors may unwind through it (LuaJIT), hence "C-unwind".
pub type DecodeFn = unsafe extern "C-unwind" fn(state: *mut lua_State, data: *mut c_void) -> c_int;
/// `bgw_free_fn`.
pub type FreeFn = unsafe extern "C" fn(data: *mut c_void);
/// `bgw_result_fn`.
pub type ResultFn = unsafe extern "C-unwind" fn(state: *mut lua_State, data: *mut c_void, nresults: c_int);

/// `bgw_api`.
#[repr(C)]
pub struct Api {
    pub version: c_uint,
    pub size: usize,
    pub acquire: unsafe extern "C-unwind" fn(state: *mut lua_State) -> *mut Handle,
    pub release: unsafe extern "C" fn(handle: *mut Handle),
    pub deliver: unsafe extern "C" fn(
        handle: *mut Handle,
        decode: Option<DecodeFn>,
        data: *mut c_void,
        free_data: Option<FreeFn>,
        timeout_ms: c_int,
    ) -> c_int,
    pub call: unsafe extern "C" fn(
        handle: *mut Handle,
        decode: Option<DecodeFn>,
        result: Option<ResultFn>,
        data: *mut c_void,
        free_data: Option<FreeFn>,
        timeout_ms: c_int,
    ) -> c_int,
    pub strerror: unsafe extern "C" fn(code: c_int) -> *const c_char,
    pub set_capacity: unsafe extern "C-unwind" fn(state: *mut lua_State, capacity: usize) -> c_int,
    pub token_get: unsafe extern "C-unwind" fn(state: *mut lua_State, index: c_int) -> *mut TokenRef,
    pub token_cancelled: unsafe extern "C" fn(token: *const TokenRef) -> c_int,
    pub token_release: unsafe extern "C" fn(token: *mut TokenRef),
}

/// `bgw_api_get`: the API published in `state`, or `None` when bgworker.core
/// is not loaded there or speaks another major version.
///
/// The table lives in bgworker's own library, which stays loaded for the life
/// of the process (header, "Lifetimes"): hence `'static`.
///
/// # Safety
/// `state` is valid, on its Lua thread, with a free stack slot.
pub unsafe fn get(state: *mut lua_State) -> Option<&'static Api> {
    unsafe {
        lua_getfield(state, LUA_REGISTRYINDEX, REGISTRY_KEY.as_ptr());
        let api = match lua_type(state, -1) {
            LUA_TLIGHTUSERDATA => lua_touserdata(state, -1) as *const Api,
            _ => std::ptr::null(),
        };
        lua_pop(state, 1);
        // SAFETY: under the registry key, bgworker publishes a `bgw_api *`.
        let api = api.as_ref()?;
        (api.version == API_VERSION && api.size >= size_of::<Api>()).then_some(api)
    }
}

/// Pin the shared object that contains this crate (the utility library it is
/// linked into) for the life of the process.
///
/// A `Sender` may be held, used and dropped by threads after the Lua state
/// closed, and all of that runs this library's code; `lua_close` would
/// otherwise unload the library under them (header, "Lifetimes").
pub fn keep_this_library_loaded() {
    static PINNED: Once = Once::new();
    PINNED.call_once(|| unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let here = keep_this_library_loaded as *const c_void;
        if libc::dladdr(here, &mut info) != 0 && !info.dli_fname.is_null() {
            // Leaked on purpose: this reference is what keeps the library mapped.
            libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE);
        }
    });
}
