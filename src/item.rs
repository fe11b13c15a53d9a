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
//! pointer for the rarer round trip, boxed; a copied record's place fits
//! where data and free_data go), so a queue of a million items costs 32 MB
//! beyond the payloads.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use crate::copy::Place;
use crate::reply::Reply;
use crate::status::Status;

/// `int decode(lua_State *L, void *data)`; `L` is opaque at this level.
pub type DecodeFn = unsafe extern "C-unwind" fn(state: *mut c_void, data: *mut c_void) -> c_int;
/// `void free_data(void *data)`.
pub type FreeFn = unsafe extern "C" fn(data: *mut c_void);
/// `void result(lua_State *L, void *data, int nresults)`.
pub type ResultFn = unsafe extern "C-unwind" fn(state: *mut c_void, data: *mut c_void, nresults: c_int);

/// What an item carries for decode: the caller's `data` and the function
/// that frees it, or a record copied into the queue's storage (`copy.rs`),
/// which needs no freeing.
pub enum Payload {
    Owned { data: *mut c_void, free_data: FreeFn },
    Copied(Place),
}

impl Payload {
    /// # Safety
    /// The caller owns `data` and gives it up: it is freed exactly once,
    /// with `free_data` or, when that is `None`, C `free()`.
    pub unsafe fn new(data: *mut c_void, free_data: Option<FreeFn>) -> Self {
        Payload::Owned { data, free_data: free_data.unwrap_or(libc::free) }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Payload::Owned { data, free_data } = *self {
            // SAFETY: the payload owns its data (`new`), and this is its only drop.
            unsafe { free_data(data) }
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

    /// The caller's data; `None` for a copied record, which the queue's
    /// buffer holds (`Queue`'s `Batch::pop` copies it out for decode).
    /// A plain item for a record copied to `place` of the queue's storage.
    pub fn copied(decode: DecodeFn, place: Place) -> Self {
        Item { decode, payload: Payload::Copied(place), round_trip: None }
    }

    pub fn data(&self) -> Option<*mut c_void> {
        match self.payload {
            Payload::Owned { data, .. } => Some(data),
            Payload::Copied(_) => None,
        }
    }

    /// The place of a copied record in its buffer's arena.
    pub fn place(&self) -> Option<Place> {
        match self.payload {
            Payload::Owned { .. } => None,
            Payload::Copied(place) => Some(place),
        }
    }

    /// Its record's place once its arena was appended to another, `by` slots long.
    pub fn move_copy_by(&mut self, by: usize) {
        if let Payload::Copied(place) = &mut self.payload {
            *place = place.moved_by(by);
        }
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

/// What a producer hands to the queue: a whole item, or a record for the
/// queue to copy into its own storage (`copy.rs`).
pub enum Delivery<'a> {
    Item(Item),
    Copy { decode: DecodeFn, bytes: &'a [u8] },
}

impl Delivery<'_> {
    pub fn reply(&self) -> Option<Arc<Reply>> {
        match self {
            Delivery::Item(item) => item.round_trip().map(|round_trip| round_trip.reply.clone()),
            Delivery::Copy { .. } => None,
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
