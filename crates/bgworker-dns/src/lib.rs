//! `bgworker.dns_native`: name resolution off the Lua thread.
//!
//! `resolve(host, callback[, token])` looks `host` up with `getaddrinfo` on
//! a thread of the calling Lua state's own (workers.rs) and delivers the
//! answer through bgworker: the dispatcher then calls
//! `callback(addresses, name)` (a list of address strings, IPv4 first, and
//! the canonical name) or `callback(nil, message)`; never, once `token`
//! (from `bgworker.core.token()`) is cancelled. It is the native half of
//! `bgworker.dns` (lua/bgworker/dns.lua), which checks the arguments and
//! offers LuaSocket's `toip`.
//!
//! `cancel(token)` gives a lookup up: `token:cancel()` (and its value),
//! then the lookups waiting for a thread start at once if they may now
//! (workers.rs: a lookup given up on no longer counts, also while its
//! thread is still in `getaddrinfo`). A token cancelled some other way
//! (`token:cancel()`, `bgworker.await`'s timeout) stops counting too, but
//! the lookups waiting behind it start only at the next `resolve` or when
//! a lookup thread finishes.

mod resolve;
mod workers;

use std::ffi::CString;
use std::sync::Arc;

use bgworker_util::ffi::lua::bad_argument;
use bgworker_util::mlua;
use bgworker_util::{Sender, Token};
use mlua::{Function, Lua, LuaString, ObjectLike, Table, Value};
use workers::Workers;

/// `resolve(host, callback[, token])`, answered through `sender` by one of
/// `workers`. With a token (`bgworker.core.token()`), a lookup cancelled
/// before its thread takes it never runs, and one cancelled later never
/// calls back: its thread delivers nothing, and an answer already on its
/// way decodes to nothing.
fn resolve(
    lua: &Lua,
    sender: &Sender,
    workers: &Arc<Workers>,
    (host, callback, token): (LuaString, Function, Value),
) -> mlua::Result<()> {
    let host = CString::new(host.as_bytes().to_vec()).map_err(|_| mlua::Error::runtime("host contains a NUL byte"))?;
    let token = match token {
        Value::Nil => None,
        value => Some(Arc::new(Token::from_lua(lua, &value)?.ok_or_else(|| not_a_token("resolve", 3, &value))?)),
    };
    let wanted = move || !token.as_ref().is_some_and(|token| token.is_cancelled());
    let callback = lua.create_registry_value(callback)?;
    let sender = sender.clone();
    workers
        .spawn(wanted.clone(), move || {
            if !wanted() {
                return;
            }
            let answer = resolve::resolve(&host);
            // Wait for room if the queue is bounded, while the answer is
            // wanted: only this state's lookups wait meanwhile (workers.rs).
            // An answer not delivered (not wanted, or the dispatcher is
            // stopped) is dropped unrun, and with it the registry reference
            // to the callback.
            let decode_wanted = wanted.clone();
            let _ = sender.deliver_while(
                move |lua| {
                    let function: Function = lua.registry_value(&callback)?;
                    lua.remove_registry_value(callback)?;
                    if !decode_wanted() {
                        return Ok((lua.create_function(|_, ()| Ok(()))?, (Value::Nil, Value::Nil)));
                    }
                    let values = match answer {
                        Ok(resolved) => {
                            let addresses =
                                lua.create_sequence_from(resolved.addresses.iter().map(|a| a.to_string()))?;
                            (Value::Table(addresses), Value::String(lua.create_string(&resolved.name)?))
                        }
                        Err(message) => (Value::Nil, Value::String(lua.create_string(&message)?)),
                    };
                    Ok((function, values))
                },
                wanted,
            );
        })
        .map_err(|e| mlua::Error::runtime(format!("cannot start a resolver thread: {e}")))
}

/// `cancel(token)`: `token:cancel()`'s value, once the lookups waiting for
/// a thread started if this one's giving up lets them (workers.rs).
fn cancel(lua: &Lua, workers: &Arc<Workers>, value: Value) -> mlua::Result<bool> {
    let first = match (&value, Token::from_lua(lua, &value)?) {
        (Value::UserData(token), Some(_)) => token.call_method("cancel", ())?,
        _ => return Err(not_a_token("cancel", 1, &value)),
    };
    workers.start_waiting();
    Ok(first)
}

/// The error for argument `position` of `fname`, which must be a token.
fn not_a_token(fname: &str, position: u32, value: &Value) -> mlua::Error {
    mlua::Error::runtime(bad_argument(position, fname, format!("token expected, got {}", value.type_name())))
}

/// The module table. Requires bgworker.core, whose instance the answers go to.
// Without `module` (the resolver's unit tests) only Lua would call it.
#[cfg_attr(not(feature = "module"), allow(dead_code))]
#[cfg_attr(feature = "module", mlua::lua_module(name = "bgworker_dns_native"))]
fn open(lua: &Lua) -> mlua::Result<Table> {
    lua.globals().get::<Function>("require")?.call::<()>("bgworker.core")?;
    let sender = Sender::new(lua)?;
    // Each lookup keeps the loop alive from the Lua side (bgworker.dns).
    sender.keep_loop_alive(lua, false)?;
    // This state's own threads: see workers.rs.
    let workers = Arc::new(Workers::default());
    let module = lua.create_table()?;
    let for_cancel = Arc::clone(&workers);
    module.set("resolve", lua.create_function(move |lua, args| resolve(lua, &sender, &workers, args))?)?;
    module.set("cancel", lua.create_function(move |lua, token| cancel(lua, &for_cancel, token))?)?;
    Ok(module)
}

// They embed a Lua: `vendored` builds only.
#[cfg(all(test, feature = "vendored"))]
mod tests;
