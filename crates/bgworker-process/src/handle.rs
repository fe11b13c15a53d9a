//! The Lua side's handle of a child: what it asks of the child's I/O
//! thread, and what it does itself (signals, under the lock: shared.rs).
//! Dropped (collected, or its Lua state closed), it kills the child's
//! group; its helper reaps it.

use std::sync::Arc;

use bgworker_util::mlua;
use mlua::{LuaString, UserData, UserDataFields, UserDataMethods, Value};

use crate::shared::Shared;

pub struct Process {
    pub shared: Arc<Shared>,
}

impl UserData for Process {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("pid", |_, this| Ok(this.shared.pid));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // `write(data)`: queue `data` for stdin; false once stdin is closed.
        methods.add_method("write", |_, this, data: LuaString| {
            let mut state = this.shared.lock();
            if state.stdin_closed || state.close_stdin {
                return Ok(false);
            }
            state.stdin.push_back(data.as_bytes().to_vec());
            drop(state);
            this.shared.wake();
            Ok(true)
        });
        // `close_stdin()`: close stdin once what was queued is written.
        methods.add_method("close_stdin", |_, this, ()| {
            this.shared.lock().close_stdin = true;
            this.shared.wake();
            Ok(())
        });
        // `kill(signal)`: `true` | `nil, "ended"` (reaped) | `nil, message`.
        methods.add_method("kill", |lua, this, signal: i32| {
            let state = this.shared.lock();
            Ok(match this.shared.signal(&state, signal) {
                Ok(true) => (Value::Boolean(true), Value::Nil),
                Ok(false) => (Value::Nil, Value::String(lua.create_string("ended")?)),
                Err(e) => (Value::Nil, Value::String(lua.create_string(e.to_string())?)),
            })
        });
        // `ack(n)`: the Lua side took `n` bytes of output.
        methods.add_method("ack", |_, this, n: usize| {
            let mut state = this.shared.lock();
            let paused = state.unread >= crate::shared::UNREAD_MAX;
            state.unread = state.unread.saturating_sub(n);
            let resume = paused && state.unread < crate::shared::UNREAD_MAX;
            drop(state);
            if resume {
                this.shared.wake();
            }
            Ok(())
        });
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.abandoned = true;
        let _ = self.shared.signal(&state, libc::SIGKILL);
        drop(state);
        self.shared.wake();
    }
}
