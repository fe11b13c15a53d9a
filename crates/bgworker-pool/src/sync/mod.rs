//! The Lua-free layer: what the Lua thread and the workers share, and
//! how they wait for each other. Generic over what a job, an event or a
//! failure is, and free of `unsafe`. Each module states its invariants at
//! its top.

pub mod board;
pub mod control;
pub mod crew;
pub mod outbox;
