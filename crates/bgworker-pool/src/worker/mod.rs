//! The worker layer: a pool's worker thread and the Lua state it owns,
//! and what crosses into and out of that state. Everything here runs on a
//! worker's thread, except `interrupt`'s signal sending and `value`'s
//! functions, which the Lua thread uses on its own state too.

pub mod interrupt;
pub mod job;
pub mod state;
pub mod thread;
pub mod value;
