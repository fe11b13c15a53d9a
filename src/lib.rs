//! bgworker: background threads of any native library deliver results into
//! a single-threaded Lua state.
//!
//! # Map
//!
//! Five layers. An item goes down them and back up: a producer calls the
//! C contract, which queues the item; the first producer since the reader
//! last drained raises the signal; the Lua loop sees it and polls through
//! the binding, which decodes the item on the Lua thread. The first four know nothing of Lua
//! and are built without a Lua-version feature; the last one, with it, is
//! the `bgworker.core` Lua module.
//!
//! 1. **The C contract** (`include/bgworker.h`), what utility libraries
//!    call, from any thread:
//!    - `capi`: its thread-safe functions (deliver, call, tokens,
//!      handles) and the layout of `bgw_api`.
//!    - `handle`: what a `bgw_handle *` points to; boxes never freed.
//!    - `status`: its return codes.
//!    - `token`: cancellation tokens, from a Lua state to the threads.
//! 2. **The queue**, from the producers to the Lua thread:
//!    - `instance`: one Lua state's queue, its producers' and reader's sides.
//!    - `item`: one delivery: decode function, data, its free.
//!    - `copy`: the arena that holds records delivered by copy.
//!    - `queue`: the items, taken all at once by a buffer swap.
//!    - `room`: room in a bounded queue, which producers wait for.
//!    - `reply`: a round trip's rendezvous.
//!    - `wait`: how long a producer may block, one deadline per call.
//! 3. **Signals**, how the reader learns that items wait:
//!    - `wake`: the coalesced wake-up protocol: one signal per drain.
//!    - `signal`: a loopback datagram or a readable descriptor.
//!    - `alarm`: waking the reader at a given time.
//!    - `lag`: how long the reader took to answer a wake-up.
//! 4. **The process**, what a fork leaves behind:
//!    - `fork`: which process the state belongs to (the generation that
//!      `bgworker_ffi::fork` counts) and the sections no fork may cut.
//!    - `sync`: std's locks, or loom's for the models (`--cfg loom`).
//! 5. **The Lua binding** (`lua/`, with a Lua-version feature): the module
//!    table over the instance (`mod.rs`), `poll` and `drain`, which share
//!    one item's decode (`decode`), the registry side of the C contract
//!    (`api`) and tokens' userdata (`token`). Its raw C API helpers and
//!    their safety rule are `bgworker_ffi::lua`'s, shared with the utility
//!    libraries; it is the only layer that touches a Lua state.

// 1. The C contract.
pub mod capi;
pub mod handle;
pub mod status;
pub mod token;

// 2. The queue.
pub mod copy;
pub mod instance;
pub mod item;
mod queue;
pub mod reply;
pub mod room;
pub mod wait;

// 3. Signals.
pub mod alarm;
pub mod lag;
pub mod signal;
pub mod wake;

// 4. The process.
pub mod fork;
mod sync;

// 5. The Lua binding.
#[cfg(feature = "lua")]
mod lua;
