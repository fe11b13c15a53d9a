//! Items delivered by copy (`bgw_api.deliver_copy`): small plain records
//! that bgworker copies into its own queue storage, so that delivering one
//! allocates nothing, on either side.

use std::ffi::{c_int, c_void};
use std::mem::{align_of, size_of};

use mlua::ffi::lua_State;

/// `BGW_COPY_MAX`: the largest record, in bytes.
pub const COPY_MAX: usize = 256;

/// A small plain record delivered by copy ([`Sender::deliver_copy`]).
///
/// The record travels as bytes: bgworker copies it in the delivering call
/// and hands decode a copy, which lives only while decode runs. It is
/// `Copy`, so there is nothing to drop, whatever happens to the item
/// (decoded, refused, or cancelled undecoded). A record holds no owning
/// pointers: nothing would free what they point to.
///
/// At most [`COPY_MAX`] bytes, aligned at most as `max_align_t`: checked
/// when `deliver_copy` is compiled for the type.
///
/// # Safety
/// `decode` is called on the Lua thread inside bgworker's poll, at most
/// once per item, and must do what `bgw_decode_fn` says (bgworker.h): push
/// a function, then its arguments, and return how many. It may raise a Lua
/// error.
///
/// [`Sender::deliver_copy`]: crate::Sender::deliver_copy
pub unsafe trait CopyItem: Copy + Send + 'static {
    /// # Safety
    /// `state` is the running Lua state, with the stack space Lua grants a
    /// C function (`LUA_MINSTACK`); check for more.
    unsafe fn decode(&self, state: *mut lua_State) -> c_int;
}

/// The record's size, refused at compile time when bgworker cannot take it.
pub const fn checked_size<I: CopyItem>() -> usize {
    assert!(size_of::<I>() <= COPY_MAX, "a CopyItem is at most COPY_MAX bytes");
    assert!(align_of::<I>() <= align_of::<libc::max_align_t>(), "a CopyItem is aligned at most as max_align_t");
    size_of::<I>()
}

/// `bgw_decode_fn` of a copied record.
pub unsafe extern "C-unwind" fn decode<I: CopyItem>(state: *mut lua_State, data: *mut c_void) -> c_int {
    // SAFETY: `data` is bgworker's copy of an `I`, aligned for any type and
    // alive while decode runs (bgworker.h, deliver_copy).
    let item = unsafe { &*(data as *const I) };
    // SAFETY: the trait's contract.
    unsafe { item.decode(state) }
}
