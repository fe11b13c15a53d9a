//! The binding layer: what runs on the Lua thread. The module table and
//! the pool's methods (`module`, which implements the contract in lib.rs),
//! the pool they drive (`pool`, which also refuses to work in a forked
//! child), and the decoding of the workers' events (`events`, where the
//! workers post them too).

pub mod events;
pub mod function;
pub mod module;
pub mod pool;
