//! The instance without Lua: the queue, the wake protocol over a real UDP
//! socket, stop, bounded room and round trips. Items carry a boxed payload
//! whose free counts itself, so every test also checks "freed exactly once".

use super::*;
use crate::copy::Scratch;
use crate::signal::FdKind;
use crate::wait::Wait;
use std::ffi::{c_int, c_void};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex as StdMutex;
use std::thread;
use std::time::{Duration, Instant};

/// Tests run in parallel: each payload counts into its own test's counter.
struct Payload {
    producer: usize,
    seq: usize,
    freed: Arc<AtomicUsize>,
}

unsafe extern "C-unwind" fn never_decoded(_state: *mut c_void, _data: *mut c_void) -> c_int {
    unreachable!("these tests take items without decoding them")
}

unsafe extern "C-unwind" fn no_result(_state: *mut c_void, _data: *mut c_void, _n: c_int) {}

unsafe extern "C" fn free_payload(data: *mut c_void) {
    let payload = unsafe { Box::from_raw(data as *mut Payload) };
    payload.freed.fetch_add(1, SeqCst);
}

fn payload(producer: usize, seq: usize, freed: &Arc<AtomicUsize>) -> *mut c_void {
    Box::into_raw(Box::new(Payload { producer, seq, freed: freed.clone() })) as *mut c_void
}

fn owned_payload(producer: usize, seq: usize, freed: &Arc<AtomicUsize>) -> crate::item::Payload {
    unsafe { crate::item::Payload::new(payload(producer, seq, freed), Some(free_payload)) }
}

fn item(producer: usize, seq: usize, freed: &Arc<AtomicUsize>) -> Delivery<'static> {
    Delivery::Item(Item::new(never_decoded, owned_payload(producer, seq, freed), None))
}

fn peek(item: &Item) -> (usize, usize) {
    let payload = unsafe { &*(item.data().unwrap() as *const Payload) };
    (payload.producer, payload.seq)
}

/// The next item, without its decode's data.
fn take(instance: &mut Instance) -> Option<Item> {
    instance.take_next(&mut Scratch::default()).map(|(item, _)| item)
}

/// A started instance and the reader socket its datagrams go to.
fn started(capacity: Option<usize>) -> (Instance, UdpSocket) {
    let reader = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut instance = Instance::default();
    instance.set_capacity(capacity).unwrap();
    instance.start(Signal::udp(reader.local_addr().unwrap().port()).unwrap()).unwrap();
    reader.connect(instance.sender().unwrap()).unwrap();
    (instance, reader)
}

fn receive_all(reader: &UdpSocket) -> usize {
    reader.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    let mut n = 0;
    while reader.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn many_producers_exactly_once_in_order_with_coalesced_wakeups() {
    const PRODUCERS: usize = 4;
    const ITEMS: usize = 100_000;
    let freed = Arc::new(AtomicUsize::new(0));
    let (mut instance, reader) = started(None);
    let shared = instance.shared().clone();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (shared, freed) = (shared.clone(), freed.clone());
            thread::spawn(move || {
                for seq in 0..ITEMS {
                    assert_eq!(shared.submit(item(p, seq, &freed), Wait::Forever), Status::Ok);
                }
            })
        })
        .collect();

    let mut next_seq = [0usize; PRODUCERS];
    let mut seen = 0;
    reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    while seen < PRODUCERS * ITEMS {
        // Wait for a datagram, then drain to empty: the reader's contract.
        reader.recv(&mut buf).expect("an item was stranded: no wake-up came");
        while let Some(item) = take(&mut instance) {
            let (p, seq) = peek(&item);
            assert_eq!(seq, next_seq[p], "producer {p} out of order");
            next_seq[p] += 1;
            seen += 1;
        }
    }
    for p in producers {
        p.join().unwrap();
    }
    assert_eq!(freed.load(SeqCst), PRODUCERS * ITEMS);
    let stats = instance.stats();
    assert_eq!(stats.delivered, (PRODUCERS * ITEMS) as u64);
    assert!(stats.wakeups < (PRODUCERS * ITEMS / 10) as u64, "wake-ups not coalesced: {stats:?}");
}

#[test]
fn stop_cancels_pending_items_and_later_delivers_are_closed() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (mut instance, _reader) = started(None);
    let shared = instance.shared().clone();
    for seq in 0..10 {
        assert_eq!(shared.submit(item(0, seq, &freed), Wait::No), Status::Ok);
    }
    assert_eq!(instance.pending(), 10);
    assert_eq!(instance.stop(), 10);
    assert_eq!(freed.load(SeqCst), 10);
    assert_eq!(shared.submit(item(0, 10, &freed), Wait::No), Status::Closed);
    assert_eq!(freed.load(SeqCst), 11, "a refused item is freed before deliver returns");
    let stats = instance.stats();
    assert_eq!((stats.cancelled, stats.rejected, stats.delivered), (10, 1, 10));
}

#[test]
fn copied_records_keep_their_bytes_and_order_beside_owned_items_and_the_bound() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (mut instance, _reader) = started(Some(3));
    let shared = instance.shared().clone();
    let submit = |delivery: Delivery| shared.submit(delivery, Wait::No);
    let copy = |seq: u64| submit(Delivery::Copy { decode: never_decoded, bytes: &[seq.to_ne_bytes(); 3].concat() });
    assert_eq!(copy(0), Status::Ok);
    assert_eq!(submit(item(0, 1, &freed)), Status::Ok);
    assert_eq!(copy(2), Status::Ok);
    assert_eq!(copy(3), Status::Full);
    let mut scratch = Scratch::default();
    let mut next = |instance: &mut Instance| {
        let (item, data) = instance.take_next(&mut scratch).unwrap();
        match item.data() {
            Some(_) => peek(&item).1 as u64,
            // SAFETY: a copied record of three words, aligned, in `scratch`.
            None => (unsafe { *(data as *const [u64; 3]) })[2],
        }
    };
    assert_eq!([next(&mut instance), next(&mut instance)], [0, 1]);
    assert_eq!(freed.load(SeqCst), 1);
    assert_eq!(copy(3), Status::Ok);
    assert_eq!(copy(4), Status::Ok);
    assert_eq!(next(&mut instance), 2);
    assert_eq!(instance.stop(), 2, "stop cancels copied records too");
    assert_eq!(copy(5), Status::Closed);
}

#[test]
fn start_after_stop_works_and_start_twice_does_not() {
    let (mut instance, _reader) = started(None);
    let port = instance.sender().unwrap().port();
    let signal = || Signal::udp(port).unwrap();
    assert_eq!(instance.start(signal()), Err(StartError::AlreadyStarted));
    instance.stop();
    assert!(instance.sender().is_none());
    instance.start(signal()).unwrap();
    instance.close();
    assert_eq!(instance.start(signal()), Err(StartError::Closed));
}

#[test]
fn the_wake_socket_is_loopback_only() {
    let (instance, _reader) = started(None);
    assert!(instance.sender().unwrap().ip().is_loopback());
}

#[test]
fn a_handle_outlives_the_instance() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (instance, _reader) = started(None);
    let shared = instance.shared().clone();
    shared.submit(item(0, 0, &freed), Wait::No);
    drop(instance);
    assert_eq!(freed.load(SeqCst), 1, "closing frees what is pending");
    assert_eq!(shared.submit(item(0, 1, &freed), Wait::Forever), Status::Closed);
    assert_eq!(freed.load(SeqCst), 2);
}

#[test]
fn bounded_queue_full_timeout_and_blocking() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (mut instance, _reader) = started(Some(2));
    let shared = instance.shared().clone();
    assert_eq!(shared.submit(item(0, 0, &freed), Wait::No), Status::Ok);
    assert_eq!(shared.submit(item(0, 1, &freed), Wait::No), Status::Ok);
    assert_eq!(shared.submit(item(0, 2, &freed), Wait::No), Status::Full);
    let soon = Instant::now() + Duration::from_millis(10);
    assert_eq!(shared.submit(item(0, 3, &freed), Wait::Until(soon)), Status::Timeout);
    assert_eq!(freed.load(SeqCst), 2);

    let blocked = {
        let (shared, freed) = (shared.clone(), freed.clone());
        thread::spawn(move || shared.submit(item(0, 4, &freed), Wait::Forever))
    };
    thread::sleep(Duration::from_millis(20));
    assert!(!blocked.is_finished(), "a blocking deliver into a full queue must wait");
    assert_eq!(peek(&take(&mut instance).unwrap()), (0, 0));
    assert_eq!(blocked.join().unwrap(), Status::Ok);
    assert_eq!(peek(&take(&mut instance).unwrap()), (0, 1));
    assert_eq!(peek(&take(&mut instance).unwrap()), (0, 4));
    assert!(take(&mut instance).is_none());
    assert_eq!(freed.load(SeqCst), 5);
}

#[test]
fn stop_releases_a_producer_blocked_on_a_full_queue() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (mut instance, _reader) = started(Some(1));
    let shared = instance.shared().clone();
    assert_eq!(shared.submit(item(0, 0, &freed), Wait::No), Status::Ok);
    let blocked = {
        let (shared, freed) = (shared.clone(), freed.clone());
        thread::spawn(move || shared.submit(item(0, 1, &freed), Wait::Forever))
    };
    thread::sleep(Duration::from_millis(20));
    assert_eq!(instance.stop(), 1);
    assert_eq!(blocked.join().unwrap(), Status::Closed);
    assert_eq!(freed.load(SeqCst), 2);
}

#[test]
fn wake_forces_a_datagram() {
    let (mut instance, reader) = started(None);
    assert_eq!(receive_all(&reader), 0);
    assert!(instance.wake());
    thread::sleep(Duration::from_millis(10));
    assert_eq!(receive_all(&reader), 1);
    assert_eq!(instance.stats().wakeups, 1);
}

/// The round trip as seen by a waiting thread, with the Lua side played by
/// the test: what matters here is who is told what, and that data is freed
/// once.
mod round_trip {
    use super::*;

    fn call(shared: &Arc<Shared>, freed: &Arc<AtomicUsize>, timeout_ms: u64) -> thread::JoinHandle<Status> {
        let (shared, freed) = (shared.clone(), freed.clone());
        thread::spawn(move || {
            let wait = Wait::Until(Instant::now() + Duration::from_millis(timeout_ms));
            shared.submit(Delivery::Item(Item::new(never_decoded, owned_payload(9, 0, &freed), Some(no_result))), wait)
        })
    }

    fn wait_for_item(instance: &mut Instance) -> Item {
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(item) = take(instance) {
                return item;
            }
            assert!(Instant::now() < give_up, "the round trip never arrived");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn completed() {
        let freed = Arc::new(AtomicUsize::new(0));
        let (mut instance, _reader) = started(None);
        let waiter = call(instance.shared(), &freed, 5_000);
        let item = wait_for_item(&mut instance);
        let reply = item.reply().unwrap();
        assert!(reply.begin_decode());
        reply.decoded();
        assert!(reply.begin_result());
        item.finish(Status::Ok);
        assert_eq!(waiter.join().unwrap(), Status::Ok);
        assert_eq!(freed.load(SeqCst), 1);
    }

    #[test]
    fn cancelled_by_stop() {
        let freed = Arc::new(AtomicUsize::new(0));
        let (mut instance, _reader) = started(None);
        let waiter = call(instance.shared(), &freed, 5_000);
        while instance.pending() == 0 {
            thread::yield_now();
        }
        instance.stop();
        assert_eq!(waiter.join().unwrap(), Status::Cancelled);
        assert_eq!(freed.load(SeqCst), 1);
    }

    #[test]
    fn timed_out_while_queued_is_freed_later_and_never_decoded() {
        let freed = Arc::new(AtomicUsize::new(0));
        let (mut instance, _reader) = started(None);
        assert_eq!(call(instance.shared(), &freed, 10).join().unwrap(), Status::Timeout);
        assert_eq!(freed.load(SeqCst), 0, "the item is still queued");
        let item = take(&mut instance).unwrap();
        assert!(!item.reply().unwrap().begin_decode());
        drop(item);
        assert_eq!(freed.load(SeqCst), 1);
    }

    #[test]
    fn refused_when_closed() {
        let freed = Arc::new(AtomicUsize::new(0));
        let (mut instance, _reader) = started(None);
        instance.stop();
        assert_eq!(call(instance.shared(), &freed, 1_000).join().unwrap(), Status::Closed);
        assert_eq!(freed.load(SeqCst), 1);
    }
}

#[test]
fn stats_are_consistent_under_concurrent_delivery() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (mut instance, _reader) = started(None);
    let shared = instance.shared().clone();
    let done = Arc::new(StdMutex::new(false));
    let producer = {
        let (shared, freed, done) = (shared.clone(), freed.clone(), done.clone());
        thread::spawn(move || {
            for seq in 0..10_000 {
                shared.submit(item(0, seq, &freed), Wait::No);
            }
            *done.lock().unwrap() = true;
        })
    };
    let mut taken = 0u64;
    while !*done.lock().unwrap() || instance.pending() > 0 {
        if take(&mut instance).is_some() {
            taken += 1;
        }
        let stats = instance.stats();
        assert!(stats.delivered >= stats.polled + stats.cancelled);
    }
    producer.join().unwrap();
    assert_eq!(taken, 10_000);
    assert_eq!(instance.stats().delivered, 10_000);
}

#[test]
fn a_descriptor_signal_is_readable_until_the_empty_poll_clears_it() {
    let freed = Arc::new(AtomicUsize::new(0));
    for kind in [FdKind::native(), FdKind::Pipe] {
        let mut instance = Instance::default();
        instance.start(Signal::fd(kind).unwrap()).unwrap();
        let fd = instance.reader_fd().unwrap();
        let readable = || {
            let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            unsafe { libc::poll(&mut pollfd, 1, 0) == 1 }
        };
        let shared = instance.shared().clone();
        shared.submit(item(0, 0, &freed), Wait::No);
        shared.submit(item(0, 1, &freed), Wait::No);
        assert!(readable(), "{kind:?}: the first deliver signals");
        assert!(take(&mut instance).is_some() && take(&mut instance).is_some());
        assert!(readable(), "{kind:?}: still readable until the drain ends");
        assert!(take(&mut instance).is_none());
        assert!(!readable(), "{kind:?}: the empty poll clears the descriptor");
        assert_eq!(instance.stats().wakeups, 1);
        assert!(instance.wake());
        assert!(readable(), "{kind:?}: wake() signals");
    }
}

#[test]
fn the_capacity_changes_while_running_and_a_stop_clears_it() {
    let freed = Arc::new(AtomicUsize::new(0));
    let (mut instance, reader) = started(None);
    let shared = instance.shared().clone();
    for seq in 0..3 {
        assert_eq!(shared.submit(item(0, seq, &freed), Wait::No), Status::Ok);
    }
    // Bounded now, with 3 queued: full until the reader took two.
    instance.set_capacity(Some(2)).unwrap();
    assert_eq!(shared.submit(item(0, 3, &freed), Wait::No), Status::Full);
    let blocked = {
        let (shared, freed) = (shared.clone(), freed.clone());
        thread::spawn(move || shared.submit(item(0, 4, &freed), Wait::Forever))
    };
    thread::sleep(Duration::from_millis(20));
    assert!(!blocked.is_finished());
    // Unbounded again: the waiting producer goes through.
    instance.set_capacity(None).unwrap();
    assert_eq!(blocked.join().unwrap(), Status::Ok);
    let seqs: Vec<_> = std::iter::from_fn(|| take(&mut instance)).map(|item| peek(&item).1).collect();
    assert_eq!(seqs, vec![0, 1, 2, 4]);

    // Set while stopped: it bounds the next start, and its stop clears it.
    instance.stop();
    instance.set_capacity(Some(1)).unwrap();
    let restart = |instance: &mut Instance| instance.start(Signal::udp(reader.local_addr().unwrap().port()).unwrap());
    restart(&mut instance).unwrap();
    assert_eq!(instance.capacity(), Some(1));
    assert_eq!(shared.submit(item(0, 5, &freed), Wait::No), Status::Ok);
    assert_eq!(shared.submit(item(0, 6, &freed), Wait::No), Status::Full);
    instance.stop();
    restart(&mut instance).unwrap();
    assert_eq!(instance.capacity(), None);
    drop(instance);
    assert_eq!(freed.load(SeqCst), 7);
}
