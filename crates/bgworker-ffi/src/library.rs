//! Staying loaded: a library whose code threads run after its Lua state
//! closed (a handle's functions, a `Sender` dropped late, a fork handler)
//! must not be unloaded by that state's `lua_close`.

use std::ffi::c_void;
use std::sync::Once;

/// Pin the shared object that holds this copy of the crate (the library
/// that calls it: lib.rs) for the life of the process, by opening it once
/// more with `RTLD_NODELETE`.
pub fn keep_this_library_loaded() {
    static PINNED: Once = Once::new();
    // SAFETY: `dladdr` fills `info` for an address of ours; `dlopen` of a
    // library already loaded only takes one more reference to it.
    PINNED.call_once(|| unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let here = keep_this_library_loaded as *const c_void;
        if libc::dladdr(here, &mut info) != 0 && !info.dli_fname.is_null() {
            // Leaked on purpose: this reference is what keeps the library mapped.
            libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE);
        }
    });
}
