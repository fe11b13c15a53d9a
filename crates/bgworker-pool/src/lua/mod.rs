//! The binding layer: what runs on the Lua thread. The module table and
//! the pool's methods (`module`, which implements the contract in lib.rs),
//! the pool they drive (`pool`), the decoding of the workers' events
//! (`events`, where the workers post them too), and a pool's refusal to
//! work in a forked child (`fork`).

pub mod events;
pub mod fork;
pub mod module;
pub mod pool;
