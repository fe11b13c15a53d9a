//! `Sender::deliver_copy` against the real bgworker core, linked into this
//! test binary, on an embedded Lua 5.4 (`--features lua54,vendored`): the
//! contract of `bgw_api.deliver_copy` (every return code, order per
//! producer, exactly once under 4 producers).

use std::ffi::c_int;
use std::thread;

use bgworker_util::harness::Harness;
use bgworker_util::mlua::{self, ffi::*};
use bgworker_util::{CopyItem, Error, Sender};

// Links the core; its luaopen is exported by name, not by a Rust path.
use bgworker as _;

extern "C-unwind" {
    fn luaopen_bgworker_core(state: *mut mlua::lua_State) -> c_int;
}

fn harness(capacity: Option<u32>) -> Harness {
    Harness::new(luaopen_bgworker_core, capacity)
}

/// A reading: `record(producer, seq, check)`, or a Lua error for a
/// negative `seq`. `check` is derived from the rest, so that a record that
/// arrives torn or mixed with another shows.
#[derive(Clone, Copy)]
struct Reading {
    producer: u32,
    seq: i32,
    check: f64,
}

impl Reading {
    fn new(producer: u32, seq: i32) -> Self {
        Reading { producer, seq, check: f64::from(producer) * 1e6 + f64::from(seq) / 4.0 }
    }
}

// SAFETY: decode pushes a function and its arguments, or raises owning nothing.
unsafe impl CopyItem for Reading {
    unsafe fn decode(&self, state: *mut mlua::lua_State) -> c_int {
        unsafe {
            if self.seq < 0 {
                lua_pushstring(state, c"reading refused".as_ptr());
                lua_error(state);
            }
            lua_getglobal(state, c"record".as_ptr());
            lua_pushinteger(state, self.producer as lua_Integer);
            lua_pushinteger(state, self.seq as lua_Integer);
            lua_pushboolean(state, (self.check == Reading::new(self.producer, self.seq).check) as c_int);
        }
        4
    }
}

fn seen(h: &Harness) -> Vec<(u32, i32)> {
    h.seen()
        .iter()
        .map(|v| {
            assert_eq!(v[2].as_boolean(), Some(true), "a record arrived torn");
            (v[0].as_u32().unwrap(), v[1].as_i32().unwrap())
        })
        .collect()
}

#[test]
fn records_from_four_threads_arrive_once_each_in_order_per_producer() {
    let h = harness(Some(64));
    let sender = Sender::new(&h.lua).unwrap();
    let (threads, items) = (4u32, 2000);
    let producers: Vec<_> = (0..threads)
        .map(|p| {
            let sender = sender.clone();
            thread::spawn(move || {
                (0..items).for_each(|seq| sender.deliver_copy_while(Reading::new(p, seq), || true).unwrap())
            })
        })
        .collect();
    let errors = h.serve_until(|| h.seen().len() == (threads as usize) * (items as usize));
    assert!(errors.is_empty(), "{errors:?}");
    producers.into_iter().for_each(|p| p.join().unwrap());
    let mut next = vec![0; threads as usize];
    for (p, seq) in seen(&h) {
        assert_eq!(seq, next[p as usize], "producer {p} out of order");
        next[p as usize] += 1;
    }
    assert_eq!(next, vec![items; threads as usize]);
}

#[test]
fn every_return_code_of_a_copy() {
    let h = harness(Some(1));
    let sender = Sender::new(&h.lua).unwrap();
    assert_eq!(sender.deliver_copy(Reading::new(0, 1)), Ok(()));
    assert_eq!(sender.deliver_copy(Reading::new(0, 2)), Err(Error::Full), "BGW_NOWAIT on a full queue");
    let mut asked = 0;
    let given_up = sender.deliver_copy_while(Reading::new(0, 3), || {
        asked += 1;
        asked < 2
    });
    assert_eq!((given_up, asked), (Err(Error::Timeout), 2));
    let (n, errors) = h.drain();
    assert_eq!((n, errors.len()), (1, 0));
    // A decode that raises is reported, and the next record goes on.
    sender.deliver_copy(Reading::new(0, -1)).unwrap();
    let (_, errors) = h.drain();
    assert!(errors.len() == 1 && errors[0].contains("reading refused"), "{errors:?}");
    sender.deliver_copy(Reading::new(0, 4)).unwrap();
    h.drain();
    sender.deliver_copy(Reading::new(0, 5)).unwrap();
    assert_eq!(h.stop(), 1, "stop cancels a queued copy");
    assert_eq!(sender.deliver_copy(Reading::new(0, 6)), Err(Error::Closed));
    assert_eq!(seen(&h), [(0, 1), (0, 4)]);
}
