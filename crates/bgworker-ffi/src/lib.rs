//! What bgworker's native libraries share at their edges with C, in one
//! place, so that each is written once: the core (`bgworker`), the
//! utility libraries built with `bgworker-util` (`bgworker-dns` among
//! them) and the pool (`bgworker-pool`).
//!
//! # Map
//!
//! - `lua` (with a Lua-version feature): Lua's C API the raw way, for the
//!   C functions whose cost or contract needs the stack itself: raising
//!   errors without skipping Rust destructors, argument checks, strings,
//!   type names, a protected `tostring`. Its top states the safety rule
//!   that every caller of Lua's C API in these libraries keeps.
//! - `fork`: which fork of the process this is (a *generation*), so that
//!   what a parent made is left alone in a child.
//! - `library`: pinning the library that calls it in memory, since
//!   threads run its code after its Lua state closed.
//! - `runtime` (with a Lua-version feature): refusing, at `luaopen`, a
//!   build for PUC Lua 5.1 in LuaJIT and the other way round.
//!
//! # One implementation, a copy of its state per library
//!
//! Each library is a shared object of its own (a cdylib), and none links
//! against another: utility libraries find the core's C API through the
//! Lua registry (`include/bgworker.h`). This crate is compiled *into* each
//! of them, so each has its own copy of its statics: its own fork counter
//! and fork handler, its own pinned-library flag. That is what each
//! needs. `library` pins the object that holds the copy that runs. A
//! generation is only ever compared with one of the same library (a pool
//! with the pool library's counter, a run with the core's), and every
//! counter counts the same forks from the moment it started watching,
//! before anything of its library recorded a generation; so no counter
//! needs to be the process's only one, and none is reached across
//! libraries. (A test binary that links several of them holds one copy,
//! which serves them all alike.)

pub mod fork;
pub mod library;
#[cfg(feature = "lua")]
pub mod lua;
#[cfg(feature = "lua")]
pub mod runtime;
