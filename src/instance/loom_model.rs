//! Loom models of the route: producers against stop, start and a bound
//! that changes while they wait (see the invariants in `instance.rs`).

use super::*;
use crate::copy::Scratch;
use crate::item::Payload;
use crate::signal::FdKind;
use loom::thread;
use std::ffi::{c_int, c_void};
use std::sync::atomic::AtomicUsize;

unsafe extern "C-unwind" fn never_decoded(_state: *mut c_void, _data: *mut c_void) -> c_int {
    unreachable!("the models take items without decoding them")
}

/// Each item's data is a counter of its own: freeing adds one.
unsafe extern "C" fn count_free(data: *mut c_void) {
    unsafe { Arc::from_raw(data as *const AtomicUsize) }.fetch_add(1, Relaxed);
}

fn item(freed: &Arc<AtomicUsize>) -> Delivery<'static> {
    let data = Arc::into_raw(freed.clone()) as *mut c_void;
    // SAFETY: `data` is a strong count that count_free takes back once.
    Delivery::Item(Item::new(never_decoded, unsafe { Payload::new(data, Some(count_free)) }, None))
}

fn started(capacity: Option<usize>) -> Instance {
    let mut instance = Instance::default();
    instance.set_capacity(capacity).unwrap();
    instance.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
    instance
}

/// A producer delivers while the Lua thread stops and starts again: the
/// route swaps under it. An item the producer was told is queued must
/// be cancelled by the stop or taken from the new run; a refused one
/// got `Closed`. Each is freed once, none is lost.
#[test]
fn an_item_delivered_across_stop_and_start_is_cancelled_taken_or_refused() {
    loom::model(|| {
        let mut instance = started(None);
        let shared = instance.shared().clone();
        let freed = Arc::new(AtomicUsize::new(0));
        let producer = {
            let freed = freed.clone();
            thread::spawn(move || shared.submit(item(&freed), Wait::Forever))
        };
        let cancelled = instance.stop();
        instance.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
        let status = producer.join().unwrap();
        let taken = std::iter::from_fn(|| instance.take_next(&mut Scratch::default())).count();
        match status {
            Status::Ok => assert_eq!(cancelled + taken, 1, "an accepted item was lost or doubled"),
            Status::Closed => assert_eq!(cancelled + taken, 0, "a refused item was queued"),
            other => panic!("deliver returned {other:?}"),
        }
        drop(instance);
        assert_eq!(freed.load(Relaxed), 1, "freed other than once");
    });
}

/// A producer waits for room in a full bounded queue while the Lua
/// thread lifts the bound and then stops. The producer must come back
/// (lifted: into the queue, then cancelled by the stop; or stopped
/// first: refused), never sleep on, and its item is freed once.
#[test]
fn a_producer_waiting_for_room_is_let_through_or_refused_as_the_route_changes() {
    loom::model(|| {
        let mut instance = started(Some(1));
        let shared = instance.shared().clone();
        let freed = Arc::new(AtomicUsize::new(0));
        assert_eq!(shared.submit(item(&freed), Wait::No), Status::Ok);
        let producer = {
            let freed = freed.clone();
            thread::spawn(move || shared.submit(item(&freed), Wait::Forever))
        };
        instance.set_capacity(None).unwrap();
        let cancelled = instance.stop();
        let status = producer.join().unwrap();
        match status {
            Status::Ok => assert_eq!(cancelled, 2),
            Status::Closed => assert_eq!(cancelled, 1),
            other => panic!("deliver returned {other:?}"),
        }
        assert_eq!(freed.load(Relaxed), 2);
    });
}

/// Handles that keep the loop alive are released on two producers' threads
/// at once: exactly one of them finds it was the last, and the listening
/// reader is then woken, so that its loop learns it may end.
#[test]
fn of_keepers_released_at_once_exactly_one_is_the_last_and_wakes_the_reader() {
    loom::model(|| {
        let instance = started(None);
        let shared = instance.shared().clone();
        shared.wake_when_unkept(true);
        assert!(shared.keep());
        assert!(!shared.keep());
        let releasers: Vec<_> = (0..2)
            .map(|_| {
                let shared = shared.clone();
                thread::spawn(move || {
                    let last = shared.unkeep();
                    if last {
                        shared.unkept();
                    }
                    last
                })
            })
            .collect();
        let lasts = releasers.into_iter().map(|r| r.join().unwrap()).filter(|&last| last).count();
        assert_eq!(lasts, 1, "the last keeper was seen {lasts} times");
        assert_eq!(shared.keepers(), 0);
        let fd = instance.reader_fd().expect("a descriptor signal");
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd on the instance's open descriptor, no waiting.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 1, "the reader was not woken");
    });
}
