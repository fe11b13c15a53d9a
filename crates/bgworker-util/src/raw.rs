//! Items that push their values with Lua's C API: for hot paths, where the
//! closures of `deliver` (an mlua call per item) cost more than the item.
//!
//! The item travels as `data` of the C contract: a box holding a share of
//! the one item and, once decode took it, the item itself. So the core owns
//! the item while decode runs, and frees it (dropping it properly) whatever
//! decode does, raising included.

use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, PoisonError};

use mlua::ffi::{lua_State, lua_error, lua_pushstring};

/// An item decoded with the raw C API.
///
/// # Safety
/// `decode` is called on the Lua thread inside bgworker's poll, at most
/// once per item, and must do what `bgw_decode_fn` says (bgworker.h): push
/// a function, then its arguments, and return how many. It keeps the rule
/// of [`crate::ffi::lua`]: it may raise a Lua error (the item is then still
/// dropped, by bgworker), but its own frame must then own nothing with a
/// destructor: borrow from `self`, never move out of it.
pub unsafe trait RawItem: Send + 'static {
    /// # Safety
    /// `state` is the running Lua state, with the stack space Lua grants a
    /// C function (`LUA_MINSTACK`); check for more.
    unsafe fn decode(&mut self, state: *mut lua_State) -> c_int;
}

/// A share of one item, waiting to be delivered by one of several attempts.
pub type Slot<I> = Arc<Mutex<Option<I>>>;

/// One attempt's `data`.
struct Attempt<I> {
    slot: Slot<I>,
    /// The item, once this attempt's decode took it from the slot.
    taken: Option<I>,
}

/// `data` for one attempt to deliver the item in `slot`.
pub fn attempt<I: RawItem>(slot: &Slot<I>) -> *mut c_void {
    Box::into_raw(Box::new(Attempt { slot: Arc::clone(slot), taken: None })) as *mut c_void
}

/// `bgw_decode_fn` of an attempt.
pub unsafe extern "C-unwind" fn decode<I: RawItem>(state: *mut lua_State, data: *mut c_void) -> c_int {
    // SAFETY: `data` is a live attempt (the core holds it while decode
    // runs), and only this decode touches it.
    let attempt = unsafe { &mut *(data as *mut Attempt<I>) };
    // Only one attempt is ever accepted (the others timed out), so it finds the item.
    attempt.taken = attempt.slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    match attempt.taken.as_mut() {
        // SAFETY: the trait's contract; the item stays owned by `data`.
        Some(item) => unsafe { item.decode(state) },
        None => unsafe {
            lua_pushstring(state, c"bgworker-util: an item was decoded twice".as_ptr());
            lua_error(state)
        },
    }
}

/// `bgw_free_fn` of an attempt: drops the attempt, and with it the item if
/// it took it, or its share of the slot.
pub unsafe extern "C" fn free<I: RawItem>(data: *mut c_void) {
    // SAFETY: from `attempt`, freed once by the core.
    drop(unsafe { Box::from_raw(data as *mut Attempt<I>) });
}
