//! Write bgworker utility libraries in Rust.
//!
//! A utility library's background threads hand results to a Lua state
//! through bgworker (see `include/bgworker.h`). This crate wraps that C
//! contract in a safe [`Sender`]: get one in the library's `luaopen`, move
//! clones of it to any thread, and deliver *closures* that run on the Lua
//! thread and return the callback to call and its arguments.
//!
//! It speaks only the C ABI of `bgworker.h`: it never links against the
//! bgworker crate, so a library built with it works with any bgworker that
//! publishes the same major API version.
//!
//! ```ignore
//! use bgworker_util::{mlua, Sender};
//! use mlua::{Function, Lua, Table};
//!
//! #[mlua::lua_module(name = "my_lib")]
//! fn my_lib(lua: &Lua) -> mlua::Result<Table> {
//!     lua.globals().get::<Function>("require")?.call::<()>("bgworker.core")?;
//!     let sender = Sender::new(lua)?;
//!     let lib = lua.create_table()?;
//!     lib.set("later", lua.create_function(move |lua, callback: Function| {
//!         let key = lua.create_registry_value(callback)?;
//!         let sender = sender.clone();
//!         std::thread::spawn(move || {
//!             // Runs on the Lua thread, when the dispatcher polls.
//!             let _ = sender.deliver(move |lua| Ok((lua.registry_value::<Function>(&key)?, 42)));
//!         });
//!         Ok(())
//!     })?)?;
//!     Ok(lib)
//! }
//! ```
//!
//! # Threads and lifetimes
//!
//! A [`Sender`] works on any thread, also after its Lua state closed (then
//! every delivery returns [`Error::Closed`]). Since such threads run this
//! library's code, [`Sender::new`] pins the library in memory for the life
//! of the process (bgworker does the same for itself).
//!
//! # Cancellation and hot paths
//!
//! A Lua caller may hand a library a token (`bgworker.core.token()`) with
//! the work it asks for: [`Token::from_lua`] takes a reference to it, and
//! [`Token::is_cancelled`] tells any thread whether the caller gave up, so
//! that it skips the work or does not deliver it ([`Sender::deliver_while`]
//! stops waiting for room when asked to).
//!
//! Libraries whose items are many and small can implement [`RawItem`] and
//! push their values with Lua's C API ([`Sender::deliver_raw_while`]),
//! saving the mlua call that a closure costs per item ([`ffi::lua`] has
//! the helpers for that, and the rule such code keeps). Small plain records
//! (a status, a few numbers) can implement [`CopyItem`] instead
//! ([`Sender::deliver_copy`]): bgworker copies them into its own queue, so
//! a delivery allocates nothing at all.
//!
//! A closure is dropped exactly once: after it ran, or unrun when its item is
//! rejected (inside the delivering call), cancelled (`stop()`), or freed
//! when the state closes (on the Lua thread, during `lua_close`). A panic in
//! its destructor aborts the process, as any panic that reaches C does.

mod abi;
mod copy;
mod error;
#[cfg(feature = "vendored")]
pub mod harness;
mod payload;
mod raw;
mod token;

use std::ffi::c_int;
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// bgworker's own helpers for Lua's C API, shared with bgworker.
pub use bgworker_ffi as ffi;
pub use mlua;
use mlua::{FromLuaMulti, Function, IntoLuaMulti, Lua};

pub use copy::{CopyItem, COPY_MAX};
pub use error::Error;
use payload::Payload;
pub use raw::RawItem;
pub use token::Token;

/// A counted handle to one Lua state's bgworker instance. Freed (released)
/// when the last clone is dropped.
struct Handle {
    api: &'static abi::Api,
    raw: NonNull<abi::Handle>,
}

// SAFETY: the contract makes every function that takes a handle callable
// from any thread ("(any thread)" in bgworker.h), and the handle is released
// once, by the last owner's drop.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: acquired once in `Sender::new`, released once here.
        unsafe { (self.api.release)(self.raw.as_ptr()) }
    }
}

/// Delivers closures from any thread into one Lua state. Cheap to clone:
/// clones share one bgworker handle.
#[derive(Clone)]
pub struct Sender {
    handle: Arc<Handle>,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").field("handle", &self.handle.raw).finish()
    }
}

/// How long [`Sender::deliver_while`] waits for room before it asks again
/// whether to go on waiting.
pub const PATIENCE_SLICE: Duration = Duration::from_millis(10);

/// The `timeout_ms` of the C API: `None` waits for ever; a duration is
/// rounded up to whole milliseconds (a wait never ends early), and is at
/// least 1, since 0 would mean "do not wait".
fn timeout_ms(timeout: Option<Duration>) -> c_int {
    match timeout {
        None => abi::FOREVER,
        Some(t) => t.as_nanos().div_ceil(1_000_000).clamp(1, c_int::MAX as u128) as c_int,
    }
}

impl Sender {
    /// A sender for `lua`'s state. Call it on the Lua thread, typically in
    /// the library's `luaopen`, after `require "bgworker.core"`.
    ///
    /// Errors: [`Error::NotLoaded`] when bgworker.core is not loaded in the
    /// state (or speaks another major API version, or its instance is
    /// closed); [`Error::Lua`] when Lua fails (out of memory).
    pub fn new(lua: &Lua) -> Result<Sender, Error> {
        bgworker_ffi::library::keep_this_library_loaded();
        let lua_error = |e: mlua::Error| Error::Lua(Some(e.to_string()));
        payload::install(lua).map_err(lua_error)?;
        let mut acquired = None;
        // SAFETY: `get` leaves the stack as it was, and `acquire` is called
        // on the Lua thread with the state, as the contract asks.
        unsafe {
            lua.exec_raw::<()>((), |state| {
                if let Some(api) = abi::get(state) {
                    acquired = Some((api, (api.acquire)(state)));
                }
            })
        }
        .map_err(lua_error)?;
        match acquired {
            Some((api, raw)) => {
                let raw = NonNull::new(raw).ok_or(Error::NotLoaded)?;
                Ok(Sender { handle: Arc::new(Handle { api, raw }) })
            }
            None => Err(Error::NotLoaded),
        }
    }

    /// Say whether this sender keeps the Lua state's loop alive: it does
    /// from [`new`](Self::new) on, as a libuv handle (`bgw_api.ref` and
    /// `unref` in `bgworker.h`). In loops that end when their work is done
    /// (Copas 4, luv), a library whose threads deliver only the answers to
    /// the Lua side's requests says `false` once, and the Lua side keeps
    /// the loop alive while it waits for them. Clones share the setting.
    /// Call it on the Lua thread.
    ///
    /// Errors: [`Error::Lua`] when Lua fails (out of memory).
    pub fn keep_loop_alive(&self, lua: &Lua, keep: bool) -> Result<(), Error> {
        let handle = &self.handle;
        let set = if keep { handle.api.r#ref } else { handle.api.unref };
        let mut code = 0;
        // SAFETY: on the Lua thread, with the state the handle was acquired in.
        unsafe { lua.exec_raw::<()>((), |state| code = set(state, handle.raw.as_ptr())) }
            .map_err(|e| Error::Lua(Some(e.to_string())))?;
        Error::check(code)
    }

    /// Queue `decode` to run on the Lua thread, without waiting: a full
    /// bounded queue gives [`Error::Full`].
    ///
    /// When the dispatcher polls the item, `decode(lua)` runs on the Lua
    /// thread and returns the callback and its arguments; the dispatcher
    /// calls the callback with them. An error (or panic) in `decode` becomes
    /// a Lua error that the dispatcher reports, and the callback is not
    /// called.
    ///
    /// Errors: [`Error::Full`], [`Error::Closed`].
    pub fn deliver<F, A>(&self, decode: F) -> Result<(), Error>
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
    {
        self.deliver_with(decode, abi::NOWAIT)
    }

    /// As [`deliver`](Self::deliver), but when the bounded queue is full,
    /// wait up to `timeout` (`None`: for ever) for room. Never call it on the
    /// Lua thread with a full queue: only that thread makes room.
    ///
    /// Errors: [`Error::Timeout`], [`Error::Closed`].
    pub fn deliver_timeout<F, A>(&self, decode: F, timeout: Option<Duration>) -> Result<(), Error>
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
    {
        self.deliver_with(decode, timeout_ms(timeout))
    }

    /// As [`deliver_timeout`](Self::deliver_timeout) with no timeout, but
    /// waits for room only while `keep_waiting()` says so: it is asked
    /// every [`PATIENCE_SLICE`] of waiting. For a thread that must stop
    /// waiting once the Lua side gave up on it (its job was cancelled, its
    /// pool is closing): the Lua thread is then busy elsewhere and may
    /// never make room. When it gives up, `decode` is dropped unrun on this
    /// thread before it returns.
    ///
    /// Errors: [`Error::Timeout`] (it gave up), [`Error::Closed`].
    pub fn deliver_while<F, A>(&self, decode: F, keep_waiting: impl FnMut() -> bool) -> Result<(), Error>
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
    {
        // An attempt that times out is freed unrun, so each one carries a
        // share of the one closure, and the attempt that runs takes it. Only
        // one attempt is ever accepted: `patiently` stops at the first that is.
        let slot = Arc::new(Mutex::new(Some(decode)));
        self.patiently(keep_waiting, |timeout_ms| {
            let attempt = Arc::clone(&slot);
            let decode = move |lua: &Lua| {
                let taken = attempt.lock().unwrap_or_else(PoisonError::into_inner).take();
                taken.ok_or_else(|| mlua::Error::runtime("bgworker-util: an item was decoded twice"))?(lua)
            };
            self.deliver_with(decode, timeout_ms)
        })
    }

    /// As [`deliver_while`](Self::deliver_while), for an item that pushes
    /// its values with Lua's C API itself ([`RawItem`]): no closure and no
    /// mlua call per item, for libraries whose items are many and small.
    ///
    /// Errors: [`Error::Timeout`] (it gave up), [`Error::Closed`].
    pub fn deliver_raw_while<I: RawItem>(&self, item: I, keep_waiting: impl FnMut() -> bool) -> Result<(), Error> {
        let slot = Arc::new(Mutex::new(Some(item)));
        self.patiently(keep_waiting, |timeout_ms| self.deliver_raw_attempt(&slot, timeout_ms))
    }

    /// As [`deliver_raw_while`](Self::deliver_raw_while), but never waits:
    /// a full bounded queue refuses the item at once (it is dropped unrun
    /// on this thread before this returns). So it may be called on the Lua
    /// thread.
    ///
    /// Errors: [`Error::Full`], [`Error::Closed`].
    pub fn deliver_raw<I: RawItem>(&self, item: I) -> Result<(), Error> {
        self.deliver_raw_attempt(&Arc::new(Mutex::new(Some(item))), abi::NOWAIT)
    }

    /// Deliver a small plain record by copy ([`CopyItem`]): bgworker copies
    /// its bytes into its own queue, so nothing is allocated or freed per
    /// item. Never waits: a full bounded queue refuses it at once, so it
    /// may be called on the Lua thread.
    ///
    /// Errors: [`Error::Full`], [`Error::Closed`].
    pub fn deliver_copy<I: CopyItem>(&self, item: I) -> Result<(), Error> {
        self.deliver_copy_attempt(&item, abi::NOWAIT)
    }

    /// As [`deliver_copy`](Self::deliver_copy), but waits for room while
    /// `keep_waiting()` says so, as [`deliver_while`](Self::deliver_while)
    /// does.
    ///
    /// Errors: [`Error::Timeout`] (it gave up), [`Error::Closed`].
    pub fn deliver_copy_while<I: CopyItem>(&self, item: I, keep_waiting: impl FnMut() -> bool) -> Result<(), Error> {
        self.patiently(keep_waiting, |timeout_ms| self.deliver_copy_attempt(&item, timeout_ms))
    }

    fn deliver_copy_attempt<I: CopyItem>(&self, item: &I, timeout_ms: c_int) -> Result<(), Error> {
        let len = const { copy::checked_size::<I>() };
        let handle = &self.handle;
        // SAFETY: the handle is live while `self` is; the core reads `len`
        // bytes of `item` during the call and keeps nothing of ours.
        let code = unsafe {
            (handle.api.deliver_copy)(
                handle.raw.as_ptr(),
                Some(copy::decode::<I>),
                (item as *const I).cast(),
                len,
                timeout_ms,
            )
        };
        Error::check(code)
    }

    fn deliver_raw_attempt<I: RawItem>(&self, slot: &Arc<Mutex<Option<I>>>, timeout_ms: c_int) -> Result<(), Error> {
        let handle = &self.handle;
        // SAFETY: the handle is live while `self` is; the attempt goes to
        // the core, which frees it with `raw::free`, once.
        let code = unsafe {
            (handle.api.deliver)(
                handle.raw.as_ptr(),
                Some(raw::decode::<I>),
                raw::attempt(slot),
                Some(raw::free::<I>),
                timeout_ms,
            )
        };
        Error::check(code)
    }

    /// Make `attempt`s with a timeout of one [`PATIENCE_SLICE`] until one
    /// is not refused for want of room, or `keep_waiting()` says to stop.
    fn patiently(
        &self,
        mut keep_waiting: impl FnMut() -> bool,
        mut attempt: impl FnMut(c_int) -> Result<(), Error>,
    ) -> Result<(), Error> {
        loop {
            let delivered = attempt(timeout_ms(Some(PATIENCE_SLICE)));
            if !matches!(delivered, Err(Error::Timeout)) || !keep_waiting() {
                return delivered;
            }
        }
    }

    fn deliver_with<F, A>(&self, decode: F, timeout_ms: c_int) -> Result<(), Error>
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
    {
        let data = Payload::deliver(decode);
        let handle = &self.handle;
        // SAFETY: the handle is live while `self` is; `data` goes to the
        // core, which frees it with `payload::free`, once, on every path.
        let code = unsafe {
            (handle.api.deliver)(handle.raw.as_ptr(), Some(payload::decode), data, Some(payload::free), timeout_ms)
        };
        Error::check(code)
    }

    /// Round trip: deliver `decode` as [`deliver`](Self::deliver) does, then
    /// wait until the callback returned, and convert its return values to
    /// `T`. `timeout` (`None`: for ever) bounds the whole wait: for room in
    /// the queue and for the reply.
    ///
    /// Never call it on the Lua thread: it would wait for itself.
    ///
    /// Errors: [`Error::Timeout`], [`Error::Closed`], [`Error::Cancelled`],
    /// and [`Error::Lua`] when `decode` failed, the callback raised, or its
    /// values do not convert to `T`.
    pub fn call<T, F, A>(&self, decode: F, timeout: Option<Duration>) -> Result<T, Error>
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
        T: FromLuaMulti + Send + 'static,
    {
        let (data, reply) = Payload::call::<T, F, A>(decode);
        let handle = &self.handle;
        // SAFETY: as in `deliver_with`; the reply travels through a channel
        // that `data` owns, never through the caller's stack.
        let code = unsafe {
            (handle.api.call)(
                handle.raw.as_ptr(),
                Some(payload::decode),
                Some(payload::result),
                data,
                Some(payload::free),
                timeout_ms(timeout),
            )
        };
        match Error::check(code) {
            // BGW_OK: `result` ran and sent the values. BGW_ERROR: decode or
            // the conversion sent its message, or the callback raised and
            // nothing was sent.
            Ok(()) | Err(Error::Lua(None)) => match reply.try_recv() {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(message)) => Err(Error::Lua(Some(message))),
                Err(_) => Err(Error::Lua(None)),
            },
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_whole_milliseconds_and_never_mean_nowait() {
        let ms = |d| timeout_ms(Some(d));
        assert_eq!(timeout_ms(None), abi::FOREVER);
        assert_eq!(ms(Duration::ZERO), 1);
        assert_eq!(ms(Duration::from_nanos(1)), 1);
        assert_eq!(ms(Duration::from_millis(1)), 1);
        assert_eq!(ms(Duration::from_micros(1500)), 2);
        assert_eq!(ms(Duration::from_secs(u64::MAX)), c_int::MAX);
    }
}
