//! bgworker: background threads of any native library deliver results into
//! a single-threaded Lua state.
//!
//! The crate is a Lua-independent core (queue, wake-up protocol, round
//! trips, the C contract's functions, fork handling) and, with a
//! Lua-version feature, the `bgworker.core` Lua module built on it (`lua/`).

pub mod alarm;
pub mod capi;
pub mod copy;
pub mod fork;
pub mod handle;
pub mod instance;
pub mod item;
pub mod lag;
mod queue;
pub mod reply;
pub mod room;
pub mod signal;
pub mod status;
mod sync;
pub mod token;
pub mod wait;
pub mod wake;

#[cfg(feature = "lua")]
mod lua;
