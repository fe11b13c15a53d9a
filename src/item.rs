//! One delivery: a decode function, its data, and how to free the data;
//! for a round trip also where the callback's values go and who waits.
//!
//! Ownership is tied to values: a [`Payload`] frees its data exactly once,
//! when it is dropped, on whatever path that happens (decoded, rejected,
//! cancelled, refused as invalid, or the state closing). The C entry points
//! wrap `data` in one first thing, so nothing else ever frees it. An
//! [`Item`] drops its payload before it tells a waiting thread the outcome
//! (field order), so when a round trip returns, its data is already gone
//! (except after a timeout).
//!
//! Size: a pending item is 32 bytes (decode, data, free_data, and one
//! pointer for the rarer round trip, boxed), so a queue of a million items
//! costs 32 MB beyond the payloads.

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

/// A delivered `data` pointer and the function that frees it.
pub struct Payload {
    data: *mut c_void,
    free_data: Option<FreeFn>,
}

impl Payload {
    /// # Safety
    /// The caller owns `data` and gives it up: it is freed exactly once,
    /// with `free_data` or, when that is `None`, C `free()`.
    pub unsafe fn new(data: *mut c_void, free_data: Option<FreeFn>) -> Self {
        Payload { data, free_data }
    }

    pub fn data(&self) -> *mut c_void {
        self.data
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        // SAFETY: the payload owns its data (`new`), and this is its only drop.
        unsafe {
            match self.free_data {
                Some(free_data) => free_data(self.data),
                None => libc::free(self.data),
            }
        }
    }
}

/// What a round trip adds to an item: where the callback's values go, and
/// the waiting thread's rendezvous, told the outcome when this is dropped.
pub struct RoundTrip {
    pub result: ResultFn,
    pub reply: Arc<Reply>,
    outcome: Status,
}

impl Drop for RoundTrip {
    fn drop(&mut self) {
        self.reply.finish(self.outcome);
    }
}

pub struct Item {
    pub decode: DecodeFn,
    // Declared before `round_trip`: dropped, so freed, before the waiter hears.
    payload: Payload,
    // Boxed: plain items, the common case, stay small (see the top).
    round_trip: Option<Box<RoundTrip>>,
}

// SAFETY: `data` is owned by the item (the contract hands it over at
// deliver), and decode/free_data are plain C functions callable from any
// thread that the contract names.
unsafe impl Send for Item {}

impl Item {
    /// A plain item, or with `result` a round trip's. Both kinds are made
    /// here and nowhere else.
    pub fn new(decode: DecodeFn, payload: Payload, result: Option<ResultFn>) -> Self {
        let round_trip =
            result.map(|result| Box::new(RoundTrip { result, reply: Arc::default(), outcome: Status::Cancelled }));
        Item { decode, payload, round_trip }
    }

    pub fn data(&self) -> *mut c_void {
        self.payload.data()
    }

    pub fn round_trip(&self) -> Option<&RoundTrip> {
        self.round_trip.as_deref()
    }

    pub fn reply(&self) -> Option<&Reply> {
        self.round_trip().map(|rt| &*rt.reply)
    }

    /// Free the data, then tell a waiting thread `status`. Dropping an item
    /// unfinished tells it `Cancelled`.
    pub fn finish(mut self, status: Status) {
        if let Some(round_trip) = &mut self.round_trip {
            round_trip.outcome = status;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Item;

    #[test]
    fn a_pending_item_takes_32_bytes() {
        assert_eq!(std::mem::size_of::<Item>(), 32);
    }
}
