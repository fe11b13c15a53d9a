//! The C contract of `include/bgworker.h`, mirrored member for member.
//!
//! This is the only thing shared with bgworker: a utility library never links
//! against it, so no Rust type crosses the boundary, only these C layouts
//! and function pointers.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::mem::size_of;

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
    /// Not called by this crate; mirrored so that the layout is the header's.
    pub set_capacity: unsafe extern "C-unwind" fn(state: *mut lua_State, capacity: usize) -> c_int,
    pub token_get: unsafe extern "C-unwind" fn(state: *mut lua_State, index: c_int) -> *mut TokenRef,
    pub token_cancelled: unsafe extern "C" fn(token: *const TokenRef) -> c_int,
    pub token_release: unsafe extern "C" fn(token: *mut TokenRef),
    pub deliver_copy: unsafe extern "C" fn(
        handle: *mut Handle,
        decode: Option<DecodeFn>,
        bytes: *const c_void,
        len: usize,
        timeout_ms: c_int,
    ) -> c_int,
    pub r#ref: unsafe extern "C-unwind" fn(state: *mut lua_State, handle: *mut Handle) -> c_int,
    pub unref: unsafe extern "C-unwind" fn(state: *mut lua_State, handle: *mut Handle) -> c_int,
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

/// The layout test: `bgw_api` as the header declares it (compiled by the C
/// compiler from `spec/native/abi_layout.c`), as the core publishes it
/// (`bgworker::capi::Api`) and as this crate reads it (`Api`) must agree
/// member for member, so that a mismatch fails here and not in a user's
/// process. `make cargo-test` runs it; `CC` and `BGWORKER_LUA_INCDIR` (the
/// directory of `lua.h`) say how to compile the C side.
#[cfg(test)]
mod layout {
    use std::mem::{offset_of, size_of};
    use std::path::Path;
    use std::process::Command;

    /// `bgw_api`'s members, in order. A new member is appended here, and to
    /// the list in `spec/native/abi_layout.c`.
    macro_rules! api_members {
        ($layout:ident!($api:ty)) => {
            $layout!($api; version, size, acquire, release, deliver, call, strerror, set_capacity, token_get,
                token_cancelled, token_release, deliver_copy, r#ref, unref)
        };
    }

    fn field_size<S, F>(_field: fn(&S) -> &F) -> usize {
        size_of::<F>()
    }

    /// `(member, offset, size)` of each member of a Rust mirror.
    macro_rules! layout {
        ($api:ty; $($member:ident),+) => {
            vec![$((stringify!($member).trim_start_matches("r#").to_string(), offset_of!($api, $member), field_size(|api: &$api| &api.$member))),+]
        };
    }

    /// Compile and run the C side; its output as (name, numbers) lines.
    fn c_side() -> Vec<(String, Vec<usize>)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let lua_include = std::env::var("BGWORKER_LUA_INCDIR").unwrap_or_else(|_| "/usr/include/lua5.4".into());
        let program = std::env::temp_dir().join(format!("bgworker-abi-layout-{}", std::process::id()));
        let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let compiled = Command::new(&compiler)
            .args(["-std=c11", "-Wall", "-Werror", "-o"])
            .arg(&program)
            .arg(format!("-I{}", root.join("include").display()))
            .arg(format!("-I{lua_include}"))
            .arg(root.join("spec/native/abi_layout.c"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {compiler:?}: {e}"));
        assert!(compiled.success(), "spec/native/abi_layout.c did not compile (BGWORKER_LUA_INCDIR={lua_include})");
        let output = Command::new(&program).output().expect("the layout program runs");
        std::fs::remove_file(&program).ok();
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| {
                let mut words = line.split_whitespace();
                let name = words.next().unwrap().to_string();
                (name, words.map(|n| n.parse().unwrap()).collect())
            })
            .collect()
    }

    #[test]
    fn the_header_the_core_and_this_crate_agree_on_bgw_api() {
        let c = c_side();
        let value = |name: &str| c.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1[0];
        let c_members: Vec<(String, usize, usize)> = c
            .iter()
            .filter(|(_, numbers)| numbers.len() == 2)
            .map(|(name, numbers)| (name.clone(), numbers[0], numbers[1]))
            .collect();
        assert_eq!(value("end"), value("sizeof"), "the C list misses members at the end of bgw_api");

        let core = api_members!(layout!(bgworker::capi::Api));
        let util = api_members!(layout!(super::Api));
        assert_eq!(core, c_members, "src/capi.rs's Api against bgworker.h");
        assert_eq!(util, c_members, "bgworker-util's Api against bgworker.h");
        assert_eq!(size_of::<bgworker::capi::Api>(), value("sizeof"));
        assert_eq!(size_of::<super::Api>(), value("sizeof"));

        assert_eq!(bgworker::capi::API_VERSION as usize, value("BGW_API_VERSION"));
        assert_eq!(super::API_VERSION as usize, value("BGW_API_VERSION"));
        assert_eq!(bgworker::room::MAX_CAPACITY, value("BGW_MAX_CAPACITY"));
        assert_eq!(bgworker::copy::MAX_COPY, value("BGW_COPY_MAX"));
        assert_eq!(crate::COPY_MAX, value("BGW_COPY_MAX"));
    }
}
