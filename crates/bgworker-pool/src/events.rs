//! A pool's events on their way to the Lua thread: each is an item
//! delivered through bgworker, whose decode returns the pool's `on_event`
//! and its arguments, `id, "progress", values...`, `id, "done",
//! results...` or `id, "failed", error, traceback`.
//!
//! Decode runs on the Lua thread and asks the board first: a progress
//! event of a job that ended (cancelled) in the meantime decodes to a
//! function that does nothing, so after a successful `cancel` the Lua side
//! hears nothing more of that job. An outcome's decode is what ends its
//! job as done or failed; an outcome dropped unread (no dispatcher, a
//! stopped one, a closed state, or a pool that closed while it waited for
//! room) ends it as cancelled.

use std::sync::Arc;

use bgworker_util::Sender;
use mlua::{Function, IntoLua, Lua, MultiValue, RegistryKey, Value as LuaValue};

use crate::board::{Board, Id};
use crate::control::{Control, PROGRESS_IN_FLIGHT};
use crate::job::{Job, Outcome};
use crate::value::Values;

#[derive(Clone)]
pub struct Events {
    sender: Sender,
    on_event: Arc<RegistryKey>,
    /// A function that does nothing: the callback of unwanted events.
    ignore: Arc<RegistryKey>,
    board: Arc<Board<Job>>,
}

/// An outcome not yet read: ends its job as cancelled if dropped so.
struct Unsettled {
    board: Arc<Board<Job>>,
    id: Id,
    settled: bool,
}

impl Unsettled {
    fn settle(mut self, failed: bool) {
        self.board.settle(self.id, failed);
        self.settled = true;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if !self.settled {
            self.board.lose(self.id);
        }
    }
}

/// `id, event, values...`.
fn event_args(lua: &Lua, id: Id, event: &str, values: Vec<LuaValue>) -> mlua::Result<MultiValue> {
    let head = [id.into_lua(lua)?, event.into_lua(lua)?];
    Ok(head.into_iter().chain(values).collect())
}

impl Events {
    /// On the Lua thread, where bgworker.core must be loaded.
    pub fn new(lua: &Lua, on_event: Function, board: Arc<Board<Job>>) -> mlua::Result<Events> {
        let sender = Sender::new(lua)?;
        let ignore = lua.create_function(|_, _: MultiValue| Ok(()))?;
        Ok(Events {
            sender,
            on_event: Arc::new(lua.create_registry_value(on_event)?),
            ignore: Arc::new(lua.create_registry_value(ignore)?),
            board,
        })
    }

    /// From job `id`'s worker: deliver a progress event, first waiting
    /// while [`PROGRESS_IN_FLIGHT`] of its events are in flight. False
    /// when the job was cancelled first.
    pub fn progress(&self, id: Id, control: &Arc<Control>, values: Values) -> bool {
        let Some(in_flight) = control.reserve(PROGRESS_IN_FLIGHT) else { return false };
        let (board, on_event, ignore) = (Arc::clone(&self.board), Arc::clone(&self.on_event), Arc::clone(&self.ignore));
        let event = move |lua: &Lua| {
            let _in_flight = in_flight;
            if !board.is_running(id) {
                return Ok((lua.registry_value::<Function>(&ignore)?, MultiValue::new()));
            }
            let args = event_args(lua, id, "progress", values.rebuild(lua)?)?;
            Ok((lua.registry_value::<Function>(&on_event)?, args))
        };
        // Not delivered (no dispatcher, or cancelled while waiting for
        // room): dropped with its reservation, as the Lua side would have.
        let _ = self.sender.deliver_while(event, || !control.is_cancelled());
        true
    }

    /// From job `id`'s worker, after `Board::finish` said so: deliver its
    /// outcome, waiting for room until the pool closes.
    pub fn outcome(&self, id: Id, outcome: Outcome) {
        let unsettled = Unsettled { board: Arc::clone(&self.board), id, settled: false };
        let on_event = Arc::clone(&self.on_event);
        let event = move |lua: &Lua| {
            let (failed, args) = match outcome_args(lua, id, &outcome) {
                Ok(args) => args,
                Err(e) => {
                    let message = format!("the job's results could not be made on the Lua thread: {e}");
                    (true, event_args(lua, id, "failed", vec![message.into_lua(lua)?, "".into_lua(lua)?])?)
                }
            };
            unsettled.settle(failed);
            Ok((lua.registry_value::<Function>(&on_event)?, args))
        };
        let board = Arc::clone(&self.board);
        let _ = self.sender.deliver_while(event, || !board.is_closed());
    }
}

/// Whether it failed, and `id, "done", results...` or `id, "failed",
/// error, traceback`.
fn outcome_args(lua: &Lua, id: Id, outcome: &Outcome) -> mlua::Result<(bool, MultiValue)> {
    Ok(match outcome {
        Outcome::Done(values) => (false, event_args(lua, id, "done", values.rebuild(lua)?)?),
        Outcome::Failed { error, traceback } => {
            let values = vec![error.rebuild(lua)?, lua.create_string(traceback)?.into_lua(lua)?];
            (true, event_args(lua, id, "failed", values)?)
        }
    })
}
