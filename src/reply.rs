//! The rendezvous of a round trip (`bgw_api.call`): a thread waits, with a
//! timeout, for the Lua side to run the callback and hand back its values.
//!
//! # Invariant
//!
//! `decode` and `result` run only while the caller of `call` is still
//! waiting, because their `data` may point into the caller's stack. So the
//! waiter may give up (time out) only in the phases where neither runs:
//!
//! ```text
//!  Queued --begin_decode--> Decoding --decoded--> Running --begin_result--> Completing --finish--> Done
//!    |                                              |
//!    +--------------- waiter times out -------------+--> Abandoned
//! ```
//!
//! In `Decoding` and `Completing` a waiter whose time is up keeps waiting:
//! those phases run one C function each and do not call Lua code of the
//! user's. `finish` from any phase but `Abandoned` ends in `Done`; once
//! abandoned, the Lua side skips `decode`/`result` and only frees the data.

use crate::status::Status;
use crate::sync::{Condvar, Mutex, MutexGuard};
use crate::wait::Wait;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Queued,
    Decoding,
    Running,
    Completing,
    Done(Status),
    Abandoned,
}

#[derive(Debug)]
pub struct Reply {
    phase: Mutex<Phase>,
    changed: Condvar,
}

impl Default for Reply {
    fn default() -> Self {
        Reply { phase: Mutex::new(Phase::Queued), changed: Condvar::new() }
    }
}

impl Reply {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        // A poisoned lock only means a panic elsewhere; the phase is still valid.
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn advance(&self, from: Phase, to: Phase) -> bool {
        let mut phase = self.phase();
        if *phase != from {
            return false;
        }
        *phase = to;
        true
    }

    /// Lua thread, before decode. `false`: the waiter gave up; skip decode.
    pub fn begin_decode(&self) -> bool {
        self.advance(Phase::Queued, Phase::Decoding)
    }

    /// Lua thread, after a successful decode: the callback may now take
    /// as long as it likes, and the waiter may time out meanwhile.
    pub fn decoded(&self) {
        self.advance(Phase::Decoding, Phase::Running);
        self.changed.notify_all();
    }

    /// Lua thread, before result. `false`: the waiter gave up; skip result.
    pub fn begin_result(&self) -> bool {
        self.advance(Phase::Running, Phase::Completing)
    }

    /// Any thread: the item is over, with this outcome for the waiter.
    pub fn finish(&self, status: Status) {
        let mut phase = self.phase();
        if matches!(*phase, Phase::Abandoned | Phase::Done(_)) {
            return;
        }
        *phase = Phase::Done(status);
        drop(phase);
        self.changed.notify_all();
    }

    /// The waiting thread: block until done, or until `wait` runs out in a
    /// phase where giving up is safe.
    pub fn wait(&self, wait: Wait) -> Status {
        let mut phase = self.phase();
        loop {
            phase = match *phase {
                Phase::Done(status) => return status,
                Phase::Abandoned => unreachable!("only the waiter abandons"),
                Phase::Queued | Phase::Running => match wait.block(&self.changed, phase) {
                    Ok(phase) => phase,
                    Err(mut phase) => {
                        *phase = Phase::Abandoned;
                        return Status::Timeout;
                    }
                },
                Phase::Decoding | Phase::Completing => Wait::Forever.block(&self.changed, phase).unwrap_or_else(|p| p),
            };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    fn soon(ms: u64) -> Wait {
        Wait::Until(Instant::now() + Duration::from_millis(ms))
    }

    #[test]
    fn the_waiter_gets_the_outcome() {
        let reply = Arc::new(Reply::default());
        let lua = {
            let reply = reply.clone();
            thread::spawn(move || {
                assert!(reply.begin_decode());
                reply.decoded();
                assert!(reply.begin_result());
                reply.finish(Status::Ok);
            })
        };
        assert_eq!(reply.wait(Wait::Forever), Status::Ok);
        lua.join().unwrap();
    }

    #[test]
    fn a_queued_item_times_out_and_is_then_skipped() {
        let reply = Reply::default();
        assert_eq!(reply.wait(soon(5)), Status::Timeout);
        assert!(!reply.begin_decode(), "decode must not run after the waiter left");
        reply.finish(Status::Cancelled);
    }

    #[test]
    fn a_running_callback_can_be_abandoned_and_result_is_skipped() {
        let reply = Reply::default();
        assert!(reply.begin_decode());
        reply.decoded();
        assert_eq!(reply.wait(soon(5)), Status::Timeout);
        assert!(!reply.begin_result());
    }

    #[test]
    fn a_waiter_does_not_leave_during_decode() {
        let reply = Arc::new(Reply::default());
        assert!(reply.begin_decode());
        let waiter = {
            let reply = reply.clone();
            thread::spawn(move || reply.wait(soon(1)))
        };
        thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished(), "the waiter left while decode could still read its data");
        reply.finish(Status::Error);
        assert_eq!(waiter.join().unwrap(), Status::Error);
    }

    #[test]
    fn finish_is_first_wins() {
        let reply = Reply::default();
        reply.finish(Status::Cancelled);
        reply.finish(Status::Ok);
        assert_eq!(reply.wait(Wait::Forever), Status::Cancelled);
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use loom::sync::Arc;
    use loom::thread;

    /// What the Lua thread does with a round trip's item. Cancelling (stop)
    /// and closing the state happen on the Lua thread too: the item is
    /// dropped there, which finishes it `Cancelled`.
    #[derive(Clone, Copy, Debug)]
    enum LuaSide {
        /// Decode, run the callback, hand its values to `result`.
        Completes,
        /// Decode, then the callback raises.
        CallbackRaises,
        /// Cancelled by `stop()` while queued.
        CancelledWhileQueued,
        /// Decoded, and the state closes while the callback runs.
        ClosedDuringCallback,
    }

    /// The caller waits (and gives up at the first moment it may, or
    /// never) while the Lua thread handles its item. Decode and result
    /// must only run while the caller still waits, since their data may
    /// live on its stack; the caller hears one outcome, and `Ok` only if
    /// `result` ran.
    #[test]
    fn decode_and_result_run_only_while_the_caller_waits() {
        let sides =
            [LuaSide::Completes, LuaSide::CallbackRaises, LuaSide::CancelledWhileQueued, LuaSide::ClosedDuringCallback];
        for side in sides {
            for wait in [Wait::No, Wait::Forever] {
                loom::model(move || {
                    let reply = Arc::new(Reply::default());
                    let waiting = Arc::new(AtomicBool::new(true));
                    let result_ran = Arc::new(AtomicBool::new(false));
                    let lua = {
                        let (reply, waiting, result_ran) = (reply.clone(), waiting.clone(), result_ran.clone());
                        thread::spawn(move || {
                            if matches!(side, LuaSide::CancelledWhileQueued) || !reply.begin_decode() {
                                return reply.finish(Status::Cancelled);
                            }
                            assert!(waiting.load(SeqCst), "{side:?}: decode ran after the caller left");
                            reply.decoded();
                            match side {
                                LuaSide::CallbackRaises => reply.finish(Status::Error),
                                LuaSide::ClosedDuringCallback => reply.finish(Status::Cancelled),
                                _ if reply.begin_result() => {
                                    assert!(waiting.load(SeqCst), "{side:?}: result ran after the caller left");
                                    result_ran.store(true, SeqCst);
                                    reply.finish(Status::Ok);
                                }
                                _ => reply.finish(Status::Cancelled),
                            }
                        })
                    };
                    let status = reply.wait(wait);
                    waiting.store(false, SeqCst);
                    lua.join().unwrap();
                    let expected: &[Status] = match (side, wait) {
                        (LuaSide::Completes, Wait::Forever) => &[Status::Ok],
                        (LuaSide::CallbackRaises, Wait::Forever) => &[Status::Error],
                        (_, Wait::Forever) => &[Status::Cancelled],
                        (LuaSide::Completes, _) => &[Status::Ok, Status::Timeout],
                        (LuaSide::CallbackRaises, _) => &[Status::Error, Status::Timeout],
                        (_, _) => &[Status::Cancelled, Status::Timeout],
                    };
                    assert!(expected.contains(&status), "{side:?} {wait:?}: the caller got {status:?}");
                    assert_eq!(
                        status == Status::Ok,
                        result_ran.load(SeqCst),
                        "{side:?}: Ok without result, or the reverse"
                    );
                });
            }
        }
    }
}
