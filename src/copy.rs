//! Storage for `deliver_copy`: the bytes of small fixed records, kept in
//! the queue's own buffers instead of a malloc per item.
//!
//! Each queue buffer (`queue.rs`) carries an arena of 16-byte [`Slot`]s
//! beside its items. A producer appends a record's bytes there under the
//! queue's lock, and its item records where they are ([`Place`]); the
//! arena travels with the items when the reader swaps buffers, and is
//! cleared when the reader hands its emptied buffer back. Both arenas keep
//! their capacity, so the steady state allocates nothing.
//!
//! # Invariants
//!
//! - An arena is only appended to while its items are queued, and cleared
//!   only when no item refers to it (the reader's buffer is empty).
//! - The reader copies a record out into a [`Scratch`] of its own stack
//!   frame as it takes the item, before any user code runs. So decode's
//!   pointer stays valid for the whole decode even when decode itself
//!   polls or drains (which may recycle the arena), and no producer ever
//!   writes where decode reads.

use std::ffi::c_void;

/// The largest record `deliver_copy` takes (`BGW_COPY_MAX` in the header).
pub const MAX_COPY: usize = 256;

/// One unit of an arena: aligned as `max_align_t`, so a record starts
/// where any C type may.
#[repr(C, align(16))]
#[derive(Clone, Copy, Default)]
pub struct Slot([u8; 16]);

const SLOT: usize = std::mem::size_of::<Slot>();
const _: () = assert!(std::mem::align_of::<Slot>() >= std::mem::align_of::<libc::max_align_t>());

/// Where a record lies in its buffer's arena: its first slot and its length
/// in bytes, in one word so that an item stays 32 bytes (`item.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place(u64);

const LEN_BITS: u32 = 16;
const _: () = assert!(MAX_COPY < 1 << LEN_BITS);

impl Place {
    fn new(slot: usize, len: usize) -> Self {
        Place(((slot as u64) << LEN_BITS) | len as u64)
    }

    fn slot(self) -> usize {
        (self.0 >> LEN_BITS) as usize
    }

    fn len(self) -> usize {
        (self.0 & ((1 << LEN_BITS) - 1)) as usize
    }

    fn slots(self) -> usize {
        self.len().div_ceil(SLOT)
    }

    /// The same record after its arena was appended to another, `by` slots long.
    pub fn moved_by(self, by: usize) -> Self {
        Place::new(self.slot() + by, self.len())
    }
}

/// Append `bytes` (at most [`MAX_COPY`]) to `arena`.
pub fn append(arena: &mut Vec<Slot>, bytes: &[u8]) -> Place {
    debug_assert!(bytes.len() <= MAX_COPY);
    let place = Place::new(arena.len(), bytes.len());
    arena.extend(bytes.chunks(SLOT).map(|chunk| {
        let mut slot = Slot::default();
        slot.0[..chunk.len()].copy_from_slice(chunk);
        slot
    }));
    place
}

/// Where the reader puts one record for its decode: on its own stack.
pub struct Scratch([Slot; MAX_COPY / SLOT]);

impl Default for Scratch {
    fn default() -> Self {
        Scratch([Slot::default(); MAX_COPY / SLOT])
    }
}

impl Scratch {
    /// Copy the record at `place` of `arena` here; a pointer to it.
    pub fn fill(&mut self, arena: &[Slot], place: Place) -> *mut c_void {
        let slots = place.slots();
        self.0[..slots].copy_from_slice(&arena[place.slot()..place.slot() + slots]);
        self.0.as_mut_ptr().cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_byte_for_byte_and_aligned() {
        let mut arena = Vec::new();
        let small = append(&mut arena, b"abc");
        let empty = append(&mut arena, b"");
        let full: Vec<u8> = (0..MAX_COPY).map(|b| b as u8).collect();
        let large = append(&mut arena, &full);
        assert_eq!(arena.len(), 1 + MAX_COPY / SLOT);
        let mut scratch = Scratch::default();
        let read = |scratch: &mut Scratch, place: Place| {
            let data = scratch.fill(&arena, place);
            assert_eq!(data as usize % std::mem::align_of::<libc::max_align_t>(), 0);
            // SAFETY: `fill` copied at least `len` bytes there.
            unsafe { std::slice::from_raw_parts(data as *const u8, place.len()) }.to_vec()
        };
        assert_eq!(read(&mut scratch, small), b"abc");
        assert_eq!(read(&mut scratch, empty), b"");
        assert_eq!(read(&mut scratch, large), full);
        assert_eq!(read(&mut scratch, small.moved_by(0)), b"abc");
    }
}
