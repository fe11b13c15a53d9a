//! Cancellation tokens of the C contract (`bgw_token`, bgworker.h): how a
//! library's threads learn that the Lua side gave up on the work they do.

use std::fmt;
use std::ptr::NonNull;

use mlua::{Lua, Value};

use crate::abi;
use crate::error::Error;

/// A counted reference to a token made by `bgworker.core.token()`. Any
/// thread may ask it, also after its Lua state closed; the reference is
/// released when it is dropped. Share one between threads with an `Arc`.
pub struct Token {
    api: &'static abi::Api,
    raw: NonNull<abi::TokenRef>,
}

// SAFETY: `token_cancelled` and `token_release` are "(any thread)" in
// bgworker.h, and the reference is released once, by drop.
unsafe impl Send for Token {}
unsafe impl Sync for Token {}

impl Token {
    /// The token that `value` is, or `Ok(None)` when it is not one. On the
    /// Lua thread.
    ///
    /// Errors: [`Error::NotLoaded`] when bgworker.core is not loaded in the
    /// state (or is too old to have tokens); [`Error::Lua`] when Lua fails.
    pub fn from_lua(lua: &Lua, value: &Value) -> Result<Option<Token>, Error> {
        let mut found = Err(Error::NotLoaded);
        // SAFETY: `get` leaves the stack as it was; token_get runs on the
        // Lua thread with `value` on top, as the contract asks.
        unsafe {
            lua.exec_raw::<()>(value, |state| {
                if let Some(api) = abi::get(state) {
                    found = Ok(NonNull::new((api.token_get)(state, -1)).map(|raw| Token { api, raw }));
                }
            })
        }
        .map_err(|e| Error::Lua(Some(e.to_string())))?;
        found
    }

    /// True once the token was cancelled (`token:cancel()`), or its Lua
    /// state closed. Cheap: an atomic load.
    pub fn is_cancelled(&self) -> bool {
        // SAFETY: a live reference (released only by drop).
        unsafe { (self.api.token_cancelled)(self.raw.as_ptr()) != 0 }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // SAFETY: got from token_get, released once, here.
        unsafe { (self.api.token_release)(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token").field("cancelled", &self.is_cancelled()).finish()
    }
}
