//! The Lua-free layer: what the Lua thread and the workers share, and
//! how they wait for each other. Generic over what a job, an event or a
//! failure is, and free of `unsafe`.
//!
//! Each module states its invariants at its top, and its loom models, at
//! its bottom, check them in every interleaving of a few threads: the
//! modules take their locks from [`locks`], which are loom's under
//! `--cfg loom`, so the models run this code, not a copy. Time is not
//! modelled (loom has no clock): a timed wait is an untimed one there,
//! and the models wait without deadlines.

pub mod board;
pub mod control;
pub mod crew;
pub mod locks;
pub mod mail;
pub mod outbox;
