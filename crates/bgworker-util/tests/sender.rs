//! `Sender` against the real bgworker core, linked into this test binary,
//! on an embedded Lua 5.4 (`--features lua54,vendored`). Every wait goes
//! through the wake protocol: a UDP socket receives the core's datagrams.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bgworker_util::harness::{Harness, PATIENCE};
use bgworker_util::mlua::{self, Function, Lua};
use bgworker_util::{Error, Sender};

// Links the core; its luaopen is exported by name, not by a Rust path.
use bgworker as _;

extern "C-unwind" {
    fn luaopen_bgworker_core(state: *mut mlua::lua_State) -> c_int;
}

fn harness(capacity: Option<u32>) -> Harness {
    Harness::new(luaopen_bgworker_core, capacity)
}

/// Counts its drops: captured by closures, it tells how often they were freed.
#[derive(Clone, Default)]
struct Drops(Arc<AtomicUsize>);

struct Token(Arc<AtomicUsize>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

impl Drops {
    fn token(&self) -> Token {
        Token(self.0.clone())
    }

    fn count(&self) -> usize {
        self.0.load(SeqCst)
    }
}

/// A closure that calls `record(values...)`, counting its drop.
fn recorder<A: mlua::IntoLuaMulti + Send + 'static>(
    drops: &Drops,
    values: A,
) -> impl FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static {
    let token = drops.token();
    move |lua| {
        let _token = token;
        Ok((lua.globals().get("record")?, values))
    }
}

#[test]
fn a_sender_is_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Sender>();
    check::<Error>();
}

#[test]
fn without_bgworker_core_there_is_no_sender() {
    assert_eq!(Sender::new(&Lua::new()).unwrap_err(), Error::NotLoaded);
}

#[test]
fn closures_from_many_threads_each_run_once_with_their_values() {
    let h = harness(None);
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    let (threads, items) = (4, 250);
    let producers: Vec<_> = (0..threads)
        .map(|t| {
            let (sender, drops) = (sender.clone(), drops.clone());
            thread::spawn(move || {
                for i in 0..items {
                    sender.deliver(recorder(&drops, (t, i, format!("item {t}.{i}")))).unwrap();
                }
            })
        })
        .collect();
    let mut run = 0;
    while run < threads * items {
        let (n, errors) = h.wait();
        assert!(errors.is_empty(), "{errors:?}");
        run += n;
    }
    producers.into_iter().for_each(|p| p.join().unwrap());
    assert_eq!(run, threads * items);
    assert_eq!(drops.count(), threads * items);
    let mut seen: Vec<(usize, usize)> = h
        .seen()
        .into_iter()
        .map(|v| {
            let (t, i) = (v[0].as_usize().unwrap(), v[1].as_usize().unwrap());
            assert_eq!(v[2].to_string().unwrap(), format!("item {t}.{i}"));
            (t, i)
        })
        .collect();
    seen.sort();
    let expected: Vec<_> = (0..threads).flat_map(|t| (0..items).map(move |i| (t, i))).collect();
    assert_eq!(seen, expected);
}

#[test]
fn every_refusal_drops_the_closure_once_and_says_why() {
    let h = harness(Some(1));
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    sender.deliver(recorder(&drops, "queued")).unwrap();
    assert_eq!(sender.deliver(recorder(&drops, "full")), Err(Error::Full));
    assert_eq!(drops.count(), 1, "refused: dropped before deliver returned");
    let short = Some(Duration::from_millis(20));
    assert_eq!(sender.deliver_timeout(recorder(&drops, "no room"), short), Err(Error::Timeout));
    assert_eq!(drops.count(), 2);
    assert_eq!(h.stop(), 1);
    assert_eq!(drops.count(), 3, "cancelled by stop: dropped unrun");
    assert_eq!(sender.deliver(recorder(&drops, "stopped")), Err(Error::Closed));
    assert_eq!(drops.count(), 4);
    assert!(h.seen().is_empty());
}

#[test]
fn a_blocked_delivery_goes_through_when_room_is_made() {
    let h = harness(Some(1));
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    sender.deliver(recorder(&drops, 1)).unwrap();
    let producer = {
        let (sender, drops) = (sender.clone(), drops.clone());
        thread::spawn(move || sender.deliver_timeout(recorder(&drops, 2), None))
    };
    h.serve_until(|| producer.is_finished());
    assert_eq!(producer.join().unwrap(), Ok(()));
    h.serve_until(|| h.seen().len() == 2);
    assert_eq!(drops.count(), 2);
}

#[test]
fn a_failing_or_panicking_closure_becomes_a_lua_error() {
    let h = harness(None);
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    let token = drops.token();
    sender
        .deliver(move |_: &Lua| -> mlua::Result<(Function, ())> {
            let _token = token;
            Err(mlua::Error::runtime("no such thing"))
        })
        .unwrap();
    let token = drops.token();
    sender
        .deliver(move |_: &Lua| -> mlua::Result<(Function, ())> {
            let _token = token;
            panic!("out of cheese")
        })
        .unwrap();
    sender.deliver(recorder(&drops, "after")).unwrap();
    let mut errors = Vec::new();
    while h.seen().is_empty() {
        errors.extend(h.wait().1);
    }
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].ends_with("decode raised an error: runtime error: no such thing"), "{}", errors[0]);
    assert!(errors[1].ends_with("decode raised an error: panicked: out of cheese"), "{}", errors[1]);
    assert_eq!(drops.count(), 3);
}

/// Run `call` on another thread while this one serves the Lua side; its
/// outcome, and the errors the Lua side saw meanwhile.
fn round_trip<T: Send + 'static>(h: &Harness, call: impl FnOnce() -> T + Send + 'static) -> (T, Vec<String>) {
    let caller = thread::spawn(call);
    let errors = h.serve_until(|| caller.is_finished());
    (caller.join().unwrap(), errors)
}

#[test]
fn a_round_trip_returns_the_callbacks_values() {
    let h = harness(None);
    let sender = Sender::new(&h.lua).unwrap();
    h.lua.load("function add(a, b, s) return a + b, s:upper() end").exec().unwrap();
    let drops = Drops::default();
    let token = drops.token();
    let (got, errors) = round_trip(&h, move || {
        sender.call::<(i64, String), _, _>(
            move |lua| {
                let _token = token;
                Ok((lua.globals().get::<Function>("add")?, (40, 2, "forty-two")))
            },
            Some(PATIENCE),
        )
    });
    assert_eq!(got, Ok((42, "FORTY-TWO".to_string())));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(drops.count(), 1);
}

#[test]
fn a_round_trip_reports_each_kind_of_failure() {
    let h = harness(None);
    let sender = Sender::new(&h.lua).unwrap();
    h.lua.load("function fail() error('callback failed') end function table() return {} end").exec().unwrap();
    let call = |name: &'static str| {
        let sender = sender.clone();
        move || {
            sender.call::<i64, _, _>(
                move |lua| {
                    if name == "missing" {
                        return Err(mlua::Error::runtime("nothing to call"));
                    }
                    Ok((lua.globals().get::<Function>(name)?, ()))
                },
                Some(PATIENCE),
            )
        }
    };
    // Each failure is also reported on the Lua side, to the dispatcher.
    let (got, errors) = round_trip(&h, call("missing"));
    assert_eq!(got, Err(Error::Lua(Some("runtime error: nothing to call".into()))));
    assert!(errors[0].ends_with("decode raised an error: runtime error: nothing to call"), "{errors:?}");

    let (got, errors) = round_trip(&h, call("fail"));
    assert_eq!(got, Err(Error::Lua(None)));
    assert!(errors[0].contains("callback failed"), "{errors:?}");

    let (got, errors) = round_trip(&h, call("table"));
    let Err(Error::Lua(Some(message))) = got else { panic!("expected a conversion error, got {got:?}") };
    assert!(message.contains("table") && message.contains("i64"), "{message}");
    assert!(errors[0].contains("result function raised an error") && errors[0].contains(&message), "{errors:?}");
}

#[test]
fn a_round_trip_times_out_and_its_closure_is_dropped_unrun() {
    let h = harness(None);
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    let closure = recorder(&drops, "late");
    let started = Instant::now();
    let got = sender.call::<(), _, _>(closure, Some(Duration::from_millis(30)));
    assert_eq!(got, Err(Error::Timeout));
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(h.drain(), (0, vec![]), "a timed-out item is skipped, not run");
    assert_eq!(drops.count(), 1);
    assert!(h.seen().is_empty());
}

#[test]
fn a_round_trip_is_cancelled_by_stop() {
    let h = harness(None);
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    let closure = recorder(&drops, "never");
    let caller = thread::spawn(move || sender.call::<(), _, _>(closure, None));
    h.socket.set_read_timeout(Some(PATIENCE)).unwrap();
    h.socket.recv(&mut [0; 16]).expect("the round trip was queued");
    assert_eq!(h.stop(), 1);
    assert_eq!(caller.join().unwrap(), Err(Error::Cancelled));
    assert_eq!(drops.count(), 1);
}

#[test]
fn after_the_state_closed_deliveries_are_refused_and_dropped_once() {
    let h = harness(None);
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    sender.deliver(recorder(&drops, "pending at close")).unwrap();
    drop(h);
    assert_eq!(drops.count(), 1, "the pending closure is dropped when the state closes");
    let late = thread::spawn({
        let (sender, drops) = (sender.clone(), drops.clone());
        move || {
            (
                sender.deliver(recorder(&drops, "late")),
                sender.deliver_timeout(recorder(&drops, "late"), None),
                sender.call::<(), _, _>(recorder(&drops, "late"), None),
            )
        }
    });
    assert_eq!(late.join().unwrap(), (Err(Error::Closed), Err(Error::Closed), Err(Error::Closed)));
    assert_eq!(drops.count(), 4);
    drop(sender);
}

#[test]
fn senders_of_one_state_share_its_runners() {
    let h = harness(None);
    let (a, b) = (Sender::new(&h.lua).unwrap(), Sender::new(&h.lua).unwrap());
    let drops = Drops::default();
    a.deliver(recorder(&drops, "a")).unwrap();
    b.deliver(recorder(&drops, "b")).unwrap();
    h.serve_until(|| h.seen().len() == 2);
    assert_eq!(drops.count(), 2);
}

#[test]
fn the_runners_refuse_a_call_from_lua() {
    let h = harness(None);
    let _sender = Sender::new(&h.lua).unwrap();
    // Find the runners in the registry and call them directly.
    let refused: Vec<String> = h
        .lua
        .load(
            r#"
            local refused = {}
            -- The runners are kept under light userdata keys.
            for k, v in pairs(debug.getregistry()) do
              if type(k) == "userdata" and type(v) == "function" then
                local ok, err = pcall(v)
                if not ok and tostring(err):find("only called by bgworker's poll", 1, true) then
                  refused[#refused + 1] = tostring(err)
                end
              end
            end
            return refused
            "#,
        )
        .eval()
        .unwrap();
    assert_eq!(refused.len(), 2, "{refused:?}");
}

#[test]
fn deliver_while_waits_for_room_only_while_asked_to() {
    let h = harness(Some(1));
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    sender.deliver(recorder(&drops, "fills the queue")).unwrap();
    let mut asked = 0;
    let gave_up = sender.deliver_while(recorder(&drops, "given up"), || {
        asked += 1;
        asked < 3
    });
    assert_eq!(gave_up, Err(Error::Timeout));
    assert_eq!(asked, 3, "asked after each slice of waiting, until told to stop");
    assert_eq!(drops.count(), 1, "dropped unrun, once, before it returned");

    let waiting = {
        let (sender, drops) = (sender.clone(), drops.clone());
        thread::spawn(move || sender.deliver_while(recorder(&drops, "delivered"), || true))
    };
    h.serve_until(|| waiting.is_finished());
    assert_eq!(waiting.join().unwrap(), Ok(()));
    h.serve_until(|| h.seen().len() == 2);
    let seen: Vec<String> = h.seen().iter().map(|v| v[0].to_string().unwrap()).collect();
    assert_eq!(seen, ["fills the queue", "delivered"]);
    assert_eq!(drops.count(), 3, "the attempts that timed out did not drop the closure");
}

/// A raw item: `record(value)`, or a Lua error when `value` is negative.
struct Raw {
    value: i64,
    _token: Token,
}

// SAFETY: decode pushes a function and its argument, or raises owning nothing.
unsafe impl bgworker_util::RawItem for Raw {
    unsafe fn decode(&mut self, state: *mut mlua::lua_State) -> c_int {
        use bgworker_util::mlua::ffi::*;
        unsafe {
            if self.value < 0 {
                lua_pushstring(state, c"raw item refused".as_ptr());
                lua_error(state);
            }
            lua_getglobal(state, c"record".as_ptr());
            lua_pushinteger(state, self.value as lua_Integer);
        }
        2
    }
}

#[test]
fn raw_items_are_decoded_or_dropped_once_whatever_happens() {
    let h = harness(Some(1));
    let sender = Sender::new(&h.lua).unwrap();
    let drops = Drops::default();
    let raw = |value| Raw { value, _token: drops.token() };
    assert_eq!(sender.deliver_raw_while(raw(1), || true), Ok(()));
    let mut asked = 0;
    let given_up = sender.deliver_raw_while(raw(2), || {
        asked += 1;
        asked < 2
    });
    assert_eq!((given_up, asked, drops.count()), (Err(Error::Timeout), 2, 1), "dropped once, unrun");
    let waiting = {
        let (sender, drops) = (sender.clone(), drops.clone());
        thread::spawn(move || {
            let raised = sender.deliver_raw_while(Raw { value: -1, _token: drops.token() }, || true);
            (raised, sender.deliver_raw_while(Raw { value: 3, _token: drops.token() }, || true))
        })
    };
    let errors = h.serve_until(|| waiting.is_finished() && h.seen().len() == 2);
    assert_eq!(waiting.join().unwrap(), (Ok(()), Ok(())));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("raw item refused"), "{errors:?}");
    let seen: Vec<i64> = h.seen().iter().map(|v| v[0].as_i64().unwrap()).collect();
    assert_eq!(seen, [1, 3]);
    assert_eq!(drops.count(), 4, "each item dropped once: decoded, refused, raised");
    sender.deliver_raw_while(raw(4), || true).unwrap();
    assert_eq!(h.stop(), 1);
    assert_eq!(drops.count(), 5, "cancelled by stop: dropped unrun");
}
