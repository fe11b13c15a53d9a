//! One delivery: a decode function, its data, and how to free the data.
//!
//! Ownership is tied to the value: an `Item` frees its data exactly once,
//! when it is dropped, on whatever path that happens (decoded, rejected,
//! cancelled, or the state closing). Nothing else ever frees `data`.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use crate::reply::Reply;
use crate::status::Status;

/// `int decode(lua_State *L, void *data)`; `L` is opaque at this level.
pub type DecodeFn = unsafe extern "C-unwind" fn(state: *mut c_void, data: *mut c_void) -> c_int;
/// `void free_data(void *data)`.
pub type FreeFn = unsafe extern "C" fn(data: *mut c_void);
/// `void result(lua_State *L, void *data, int nresults)`.
pub type ResultFn = unsafe extern "C-unwind" fn(state: *mut c_void, data: *mut c_void, nresults: c_int);

/// What a round trip adds to an item: the waiting thread's rendezvous and
/// where the callback's values go.
pub struct RoundTrip {
    pub reply: Arc<Reply>,
    pub result: ResultFn,
}

pub struct Item {
    pub decode: DecodeFn,
    pub data: *mut c_void,
    free_data: Option<FreeFn>,
    pub round_trip: Option<RoundTrip>,
    /// What the waiting thread is told if the item is dropped now.
    outcome: Status,
}

// SAFETY: `data` is owned by the item (the contract hands it over at
// deliver), and decode/free_data are plain C functions callable from any
// thread that the contract names.
unsafe impl Send for Item {}

impl Item {
    pub fn new(decode: DecodeFn, data: *mut c_void, free_data: Option<FreeFn>, round_trip: Option<RoundTrip>) -> Self {
        Item { decode, data, free_data, round_trip, outcome: Status::Cancelled }
    }

    pub fn reply(&self) -> Option<&Reply> {
        self.round_trip.as_ref().map(|rt| &*rt.reply)
    }

    /// Free the data, then tell a waiting thread `status`.
    pub fn finish(mut self, status: Status) {
        self.outcome = status;
    }
}

/// Free `data` with `free_data`, or with C `free()` when it is absent.
///
/// # Safety
/// The caller owns `data` and gives it up: the contract hands it over to be
/// freed exactly once, with `free_data` or, when that is NULL, `free()`.
pub unsafe fn free_payload(data: *mut c_void, free_data: Option<FreeFn>) {
    unsafe {
        match free_data {
            Some(free_data) => free_data(data),
            None => libc::free(data),
        }
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        // Free before releasing the waiter, so that when a round trip
        // returns, its data is already gone (except after a timeout).
        // SAFETY: the item owns its data, and this is its only drop.
        unsafe { free_payload(self.data, self.free_data) };
        if let Some(reply) = self.reply() {
            reply.finish(self.outcome);
        }
    }
}
