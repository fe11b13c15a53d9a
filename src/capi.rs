//! The thread-safe half of the C contract (`include/bgworker.h`): what a
//! utility library's threads call. `acquire` and `set_capacity` need a Lua
//! state and live with the Lua binding.
//!
//! A `bgw_handle *` is the address of a [`HandleBox`] (`handle.rs`) that
//! holds one strong count of an `Arc<Shared>`, so the producers' side
//! outlives the Lua state for as long as a handle is held, and a deliver
//! after the state closed finds no route and returns `BGW_CLOSED`. A
//! released box reads "released": a call with it, or a second release, is
//! reported once on stderr and refused (`BGW_INVALID`, data freed).
//!
//! Every entry point wraps `data` in a [`Payload`] before anything else, so
//! it is freed on every path that does not queue it. `deliver_copy` takes
//! nothing: it reads the caller's bytes during the call, and copies them
//! into the queue's storage (`copy.rs`) if it queues them.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use crate::copy::MAX_COPY;
use crate::handle::HandleBox;
use crate::instance::Shared;
use crate::item::{DecodeFn, Delivery, FreeFn, Item, Payload, ResultFn};
use crate::status::Status;
use crate::token::Token;
use crate::wait::Wait;

/// `bgw_handle`: opaque to C.
#[repr(C)]
pub struct Handle {
    _opaque: [u8; 0],
}

/// `bgw_api` of the header, member for member.
#[repr(C)]
pub struct Api {
    pub version: c_uint,
    pub size: usize,
    pub acquire: unsafe extern "C-unwind" fn(state: *mut c_void) -> *mut Handle,
    pub release: unsafe extern "C" fn(handle: *mut Handle),
    pub deliver: unsafe extern "C" fn(
        handle: *mut Handle,
        decode: Option<DecodeFn>,
        data: *mut c_void,
        free_data: Option<FreeFn>,
        timeout_ms: c_int,
    ) -> c_int,
    pub call: unsafe extern "C" fn(
        handle: *mut Handle,
        decode: Option<DecodeFn>,
        result: Option<ResultFn>,
        data: *mut c_void,
        free_data: Option<FreeFn>,
        timeout_ms: c_int,
    ) -> c_int,
    pub strerror: extern "C" fn(code: c_int) -> *const c_char,
    pub set_capacity: unsafe extern "C-unwind" fn(state: *mut c_void, capacity: usize) -> c_int,
    pub token_get: unsafe extern "C-unwind" fn(state: *mut c_void, index: c_int) -> *mut TokenRef,
    pub token_cancelled: unsafe extern "C" fn(token: *const TokenRef) -> c_int,
    pub token_release: unsafe extern "C" fn(token: *mut TokenRef),
    pub deliver_copy: unsafe extern "C" fn(
        handle: *mut Handle,
        decode: Option<DecodeFn>,
        bytes: *const c_void,
        len: usize,
        timeout_ms: c_int,
    ) -> c_int,
    pub r#ref: unsafe extern "C-unwind" fn(state: *mut c_void, handle: *mut Handle) -> c_int,
    pub unref: unsafe extern "C-unwind" fn(state: *mut c_void, handle: *mut Handle) -> c_int,
}

/// `bgw_token`: opaque to C. A reference is an `Arc<Token>` turned into a
/// raw pointer: one strong count, released once.
#[repr(C)]
pub struct TokenRef {
    _opaque: [u8; 0],
}

/// A new reference to `token`.
pub fn new_token_ref(token: &Arc<Token>) -> *mut TokenRef {
    Arc::into_raw(Arc::clone(token)) as *mut TokenRef
}

/// # Safety
/// `token` is NULL or a reference from `new_token_ref` not yet released.
pub unsafe extern "C" fn token_cancelled(token: *const TokenRef) -> c_int {
    // SAFETY: a live reference is a leaked strong count.
    unsafe { (token as *const Token).as_ref() }.is_some_and(Token::is_cancelled) as c_int
}

/// # Safety
/// `token` is NULL or a live reference, released this once.
pub unsafe extern "C" fn token_release(token: *mut TokenRef) {
    if !token.is_null() {
        // SAFETY: the contract releases each reference from `new_token_ref` once.
        drop(unsafe { Arc::from_raw(token as *const Token) });
    }
}

pub const API_VERSION: c_uint = 1;

/// A new handle: one more strong count on `shared`, in a box, and one
/// more keeper of its loop; also whether it is the first keeper.
pub fn new_handle(shared: &Arc<Shared>) -> (*mut Handle, bool) {
    let boxed: *const HandleBox = HandleBox::new(Arc::into_raw(shared.clone()));
    (boxed.cast_mut().cast(), shared.keep())
}

/// Say whether a handle keeps its loop alive (`bgw_api.ref`, `unref`):
/// whether that changed the keepers between none and some, or
/// `Status::Invalid` for NULL and a released handle.
///
/// # Safety
/// `handle` is NULL or came from `new_handle`.
pub unsafe fn set_kept(handle: *mut Handle, kept: bool) -> Result<bool, Status> {
    let function = if kept { "ref" } else { "unref" };
    let boxed = unsafe { handle_box(handle) }.ok_or(Status::Invalid)?;
    let shared = unsafe { resolve(handle, function) }.ok_or(Status::Invalid)?;
    Ok(match (boxed.set_kept(kept), kept) {
        (false, true) => shared.keep(),
        (true, false) => shared.unkeep(),
        _ => false,
    })
}

/// The box of a non-NULL handle.
///
/// # Safety
/// `handle` is NULL or came from `new_handle`: boxes are never freed.
unsafe fn handle_box(handle: *mut Handle) -> Option<&'static HandleBox> {
    unsafe { (handle as *const HandleBox).as_ref() }
}

/// Say once per process, on stderr, that a released handle was used. A
/// plain `write(2)`: std's stderr lock could be held by a thread that a
/// forked child does not have.
fn report_misuse(function: &str) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    if REPORTED.swap(true, Relaxed) {
        return;
    }
    let message = format!(
        "bgworker: bgw_api.{function} was called with a handle that was already released: a bug in the caller \
         (bgworker.h, bgw_api.release); the call was refused. Later misuse is not reported.\n"
    );
    // SAFETY: writes from our buffer to the standard error descriptor.
    unsafe { libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), message.len()) };
}

/// The producers' side behind a handle: `None` for NULL, and for a
/// released handle, which is reported.
///
/// # Safety
/// As for `handle_box`.
unsafe fn resolve<'a>(handle: *mut Handle, function: &str) -> Option<&'a Shared> {
    let boxed = unsafe { handle_box(handle) }?;
    match boxed.target() {
        // SAFETY: a live box holds a strong count, so the `Shared` is alive.
        Some(target) => Some(unsafe { &*target }),
        None => {
            report_misuse(function);
            None
        }
    }
}

/// # Safety
/// `handle` is NULL or came from `new_handle`.
pub unsafe extern "C" fn release(handle: *mut Handle) {
    let Some(boxed) = (unsafe { handle_box(handle) }) else {
        return;
    };
    // Before the box is released: from then on a later acquire may reuse it.
    let kept = boxed.set_kept(false);
    match boxed.release() {
        Some(target) => {
            // SAFETY: the box held this strong count; its first release hands it back.
            let shared = unsafe { Arc::from_raw(target) };
            if kept && shared.unkeep() {
                shared.unkept();
            }
        }
        None => report_misuse("release"),
    }
}

/// What a C entry point asks for.
enum Kind {
    Deliver(Payload),
    /// A round trip, with its `result` (NULL is invalid).
    Call(Payload, Option<ResultFn>),
    /// The caller's `len` bytes at `bytes`, copied into the queue if queued
    /// (NULL with a nonzero `len`, or `len` above [`MAX_COPY`], is invalid).
    Copy(*const c_void, usize),
}

impl Kind {
    fn function(&self) -> &'static str {
        match self {
            Kind::Deliver(_) => "deliver",
            Kind::Call(..) => "call",
            Kind::Copy(..) => "deliver_copy",
        }
    }
}

/// Every entry point: check the arguments, make the delivery, queue it (and
/// for a round trip wait for the reply). An invalid call frees the data and
/// is counted as rejected where there is an instance.
///
/// # Safety
/// As for `handle_box`; for `Kind::Copy`, `bytes` is readable for `len`
/// bytes during the call (when not NULL).
unsafe fn submit(handle: *mut Handle, kind: Kind, decode: Option<DecodeFn>, timeout_ms: c_int) -> c_int {
    let shared = unsafe { resolve(handle, kind.function()) };
    let wait = Wait::from_timeout_ms(timeout_ms);
    let delivery = match (decode, kind) {
        (Some(decode), Kind::Deliver(payload)) => Some(Delivery::Item(Item::new(decode, payload, None))),
        // A round trip always waits for its reply: "do not wait" means nothing there.
        (Some(decode), Kind::Call(payload, Some(result))) if wait != Wait::No => {
            Some(Delivery::Item(Item::new(decode, payload, Some(result))))
        }
        (Some(decode), Kind::Copy(bytes, len)) if len <= MAX_COPY && (len == 0 || !bytes.is_null()) => {
            // SAFETY: the caller's bytes, readable for `len` during the call.
            let bytes = if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(bytes.cast(), len) } };
            Some(Delivery::Copy { decode, bytes })
        }
        // Anything else is invalid: its data, if any, is freed here.
        _ => None,
    };
    match (shared, delivery) {
        (Some(shared), Some(delivery)) => shared.submit(delivery, wait).code(),
        (shared, _) => {
            if let Some(shared) = shared {
                shared.note_rejected();
            }
            Status::Invalid.code()
        }
    }
}

/// # Safety
/// `handle` is NULL or came from `new_handle`; `data` is the caller's to give away.
pub unsafe extern "C" fn deliver(
    handle: *mut Handle,
    decode: Option<DecodeFn>,
    data: *mut c_void,
    free_data: Option<FreeFn>,
    timeout_ms: c_int,
) -> c_int {
    unsafe { submit(handle, Kind::Deliver(Payload::new(data, free_data)), decode, timeout_ms) }
}

/// # Safety
/// As for `deliver`.
pub unsafe extern "C" fn call(
    handle: *mut Handle,
    decode: Option<DecodeFn>,
    result: Option<ResultFn>,
    data: *mut c_void,
    free_data: Option<FreeFn>,
    timeout_ms: c_int,
) -> c_int {
    unsafe { submit(handle, Kind::Call(Payload::new(data, free_data), result), decode, timeout_ms) }
}

/// # Safety
/// `handle` is NULL or came from `new_handle`; `bytes` is NULL or readable
/// for `len` bytes during the call.
pub unsafe extern "C" fn deliver_copy(
    handle: *mut Handle,
    decode: Option<DecodeFn>,
    bytes: *const c_void,
    len: usize,
    timeout_ms: c_int,
) -> c_int {
    unsafe { submit(handle, Kind::Copy(bytes, len), decode, timeout_ms) }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::instance::Instance;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// Tests run in parallel: each frees into the counter its data points to.
    unsafe extern "C" fn count_free(data: *mut c_void) {
        unsafe { &*(data as *const AtomicUsize) }.fetch_add(1, SeqCst);
    }

    unsafe extern "C-unwind" fn decode(_state: *mut c_void, _data: *mut c_void) -> c_int {
        0
    }

    unsafe extern "C-unwind" fn result(_state: *mut c_void, _data: *mut c_void, _n: c_int) {}

    #[test]
    fn invalid_arguments_free_the_data_and_say_so() {
        let instance = Instance::default();
        let (handle, _) = new_handle(instance.shared());
        let freed = AtomicUsize::new(0);
        let data = &freed as *const AtomicUsize as *mut c_void;
        let invalid = Status::Invalid.code();
        let null: *mut c_void = std::ptr::null_mut();
        // SAFETY: `handle` is live until released at the end; NULL is allowed.
        unsafe {
            assert_eq!(deliver(null.cast(), Some(decode), data, Some(count_free), 0), invalid);
            assert_eq!(deliver(handle, None, data, Some(count_free), 0), invalid);
            assert_eq!(call(handle, Some(decode), None, data, Some(count_free), -1), invalid);
            assert_eq!(call(handle, Some(decode), Some(result), data, Some(count_free), 0), invalid);
            // Not started: refused, and still freed.
            assert_eq!(deliver(handle, Some(decode), data, Some(count_free), 0), Status::Closed.code());
            assert_eq!(freed.load(SeqCst), 5);
            release(handle);
            release(null.cast());
        }
    }

    #[test]
    fn an_invalid_copy_is_refused_and_counted() {
        let instance = Instance::default();
        let (handle, _) = new_handle(instance.shared());
        let bytes = [0u8; MAX_COPY + 1];
        let at = bytes.as_ptr().cast();
        let invalid = Status::Invalid.code();
        // SAFETY: `handle` is live until released at the end; NULL is allowed.
        unsafe {
            assert_eq!(deliver_copy(std::ptr::null_mut(), Some(decode), at, 1, 0), invalid);
            assert_eq!(deliver_copy(handle, None, at, 1, 0), invalid);
            assert_eq!(deliver_copy(handle, Some(decode), at, MAX_COPY + 1, 0), invalid);
            assert_eq!(deliver_copy(handle, Some(decode), std::ptr::null(), 1, 0), invalid);
            // Valid, up to the maximum and with nothing at all, but not started.
            assert_eq!(deliver_copy(handle, Some(decode), at, MAX_COPY, 0), Status::Closed.code());
            assert_eq!(deliver_copy(handle, Some(decode), std::ptr::null(), 0, 0), Status::Closed.code());
            release(handle);
        }
        assert_eq!(instance.stats().rejected, 5);
    }

    #[test]
    fn token_references_are_counted_and_null_is_ignored() {
        let scope = Arc::new(crate::token::Scope::default());
        let token = Arc::new(Token::new(&scope));
        let reference = new_token_ref(&token);
        assert_eq!(Arc::strong_count(&token), 2);
        // SAFETY: `reference` is live until released; NULL is allowed.
        unsafe {
            assert_eq!(token_cancelled(reference), 0);
            token.cancel();
            assert_eq!(token_cancelled(reference), 1);
            assert_eq!(token_cancelled(std::ptr::null()), 0);
            token_release(reference);
            token_release(std::ptr::null_mut());
        }
        assert_eq!(Arc::strong_count(&token), 1);
    }

    #[test]
    fn a_released_handle_is_refused_its_data_freed_and_a_second_release_ignored() {
        let instance = Instance::default();
        let (handle, _) = new_handle(instance.shared());
        assert_eq!(Arc::strong_count(instance.shared()), 2);
        let freed = AtomicUsize::new(0);
        let data = &freed as *const AtomicUsize as *mut c_void;
        // SAFETY: the misuse under test; the box stays valid memory.
        unsafe {
            release(handle);
            assert_eq!(Arc::strong_count(instance.shared()), 1);
            assert_eq!(deliver(handle, Some(decode), data, Some(count_free), -1), Status::Invalid.code());
            assert_eq!(call(handle, Some(decode), Some(result), data, Some(count_free), -1), Status::Invalid.code());
            release(handle);
        }
        assert_eq!(freed.load(SeqCst), 2);
        assert_eq!(Arc::strong_count(instance.shared()), 1, "the second release took a count it did not hold");
    }

    #[test]
    fn handles_keep_the_loop_until_unref_or_release() {
        let instance = Instance::default();
        let shared = instance.shared();
        let (first, was_first) = new_handle(shared);
        let (second, _) = new_handle(shared);
        assert!(was_first);
        assert_eq!(shared.keepers(), 2);
        // SAFETY: both handles are live until released; the misuse of a released one is under test.
        unsafe {
            assert_eq!(set_kept(first, false), Ok(false), "one keeper is left");
            assert_eq!(set_kept(first, false), Ok(false), "an unref'd handle is unref'd once");
            assert_eq!(shared.keepers(), 1);
            release(first);
            assert_eq!(shared.keepers(), 1, "an unref'd handle's release keeps nothing less");
            assert_eq!(set_kept(second, false), Ok(true), "the last keeper went");
            assert_eq!(set_kept(second, true), Ok(true), "the first keeper came");
            release(second);
            assert_eq!(shared.keepers(), 0);
            assert_eq!(set_kept(second, true), Err(Status::Invalid));
            assert_eq!(set_kept(std::ptr::null_mut(), true), Err(Status::Invalid));
        }
        assert_eq!(shared.keepers(), 0);
    }

    #[test]
    fn strerror_names_every_code() {
        let name = |c| unsafe { std::ffi::CStr::from_ptr(crate::status::strerror(c)) }.to_str().unwrap();
        assert_eq!(name(0), "BGW_OK");
        assert_eq!(name(6), "BGW_ERROR");
        assert_eq!(name(99), "BGW_UNKNOWN");
    }
}
