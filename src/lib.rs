//! bgworker: background threads of any native library deliver results into
//! a single-threaded Lua state.
//!
//! The crate is a Lua-independent core (queue, wake-up protocol, round
//! trips, the C contract's functions, fork handling) and, with a
//! Lua-version feature, the `bgworker.core` Lua module built on it (`lua/`).
//!
//! # Map
//!
//! - The C contract (`include/bgworker.h`), what utility libraries call:
//!   - `capi`: its thread-safe functions (deliver, call, tokens, handles).
//!   - `handle`: what a `bgw_handle *` points to; boxes never freed.
//!   - `status`: its return codes.
//!   - `token`: cancellation tokens, from a Lua state to the threads.
//! - The queue, from the producers to the Lua thread:
//!   - `instance`: one Lua state's queue: producers' and reader's sides.
//!   - `item`: one delivery: decode function, data, its free.
//!   - `copy`: the arena that holds records delivered by copy.
//!   - `queue`: the items, taken all at once by a buffer swap.
//!   - `room`: room in a bounded queue, which producers wait for.
//!   - `reply`: a round trip's rendezvous.
//!   - `wait`: how long a producer may block, one deadline per call.
//! - Signals, how the reader learns that items wait:
//!   - `wake`: the coalesced wake-up protocol.
//!   - `signal`: a loopback datagram or a readable descriptor.
//!   - `alarm`: waking the reader at a given time.
//!   - `lag`: how long the reader took to answer a wake-up.
//! - The process:
//!   - `fork`: which process the core's state belongs to.
//!   - `sync`: std's locks, or loom's for the models (`--cfg loom`).
//! - `lua`: the `bgworker.core` Lua module over the instance.

// The C contract.
pub mod capi;
pub mod handle;
pub mod status;
pub mod token;

// The queue.
pub mod copy;
pub mod instance;
pub mod item;
mod queue;
pub mod reply;
pub mod room;
pub mod wait;

// Signals.
pub mod alarm;
pub mod lag;
pub mod signal;
pub mod wake;

// The process.
pub mod fork;
mod sync;

// The Lua binding.
#[cfg(feature = "lua")]
mod lua;
