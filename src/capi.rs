//! The thread-safe half of the C contract (`include/bgworker.h`): what a
//! utility library's threads call. `acquire` needs a Lua state and lives
//! with the Lua binding.
//!
//! A `bgw_handle *` is an `Arc<Shared>` turned into a raw pointer: each
//! handle is one strong count, so the producers' side outlives the Lua
//! state for as long as a handle is held, and a deliver after the state
//! closed finds no route and returns `BGW_CLOSED`.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::instance::Shared;
use crate::item::{free_payload, DecodeFn, FreeFn, Item, ResultFn};
use crate::room::Wait;
use crate::status::Status;
use crate::token::Token;

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

/// A new handle: one more strong count on `shared`.
pub fn new_handle(shared: &Arc<Shared>) -> *mut Handle {
    Arc::into_raw(shared.clone()) as *mut Handle
}

/// Borrow the shared side behind a handle, or `None` for NULL.
///
/// # Safety
/// `handle` is NULL or a handle from `new_handle` not yet released.
unsafe fn shared<'a>(handle: *mut Handle) -> Option<&'a Shared> {
    // SAFETY: a live handle is a leaked strong count, so the `Shared` is alive.
    unsafe { (handle as *const Shared).as_ref() }
}

/// # Safety
/// `handle` is NULL or a live handle, released this once.
pub unsafe extern "C" fn release(handle: *mut Handle) {
    if !handle.is_null() {
        // SAFETY: the contract releases each handle from `new_handle` once.
        drop(unsafe { Arc::from_raw(handle as *const Shared) });
    }
}

/// Refuse a call with invalid arguments: free the data (the contract takes
/// it whatever happens) and count the rejection where there is an instance.
///
/// # Safety
/// As for `free_payload`.
unsafe fn invalid(shared: Option<&Shared>, data: *mut c_void, free_data: Option<FreeFn>) -> c_int {
    unsafe { free_payload(data, free_data) };
    if let Some(shared) = shared {
        shared.note_rejected();
    }
    Status::Invalid.code()
}

fn wait_for(timeout_ms: c_int) -> Wait {
    match timeout_ms {
        0 => Wait::No,
        t if t < 0 => Wait::Forever,
        t => Wait::Until(Instant::now() + Duration::from_millis(t as u64)),
    }
}

/// # Safety
/// `handle` is NULL or a live handle; `data` is the caller's to give away.
pub unsafe extern "C" fn deliver(
    handle: *mut Handle,
    decode: Option<DecodeFn>,
    data: *mut c_void,
    free_data: Option<FreeFn>,
    timeout_ms: c_int,
) -> c_int {
    // SAFETY: the caller holds the handle (contract).
    let shared = unsafe { shared(handle) };
    let (Some(shared), Some(decode)) = (shared, decode) else {
        return unsafe { invalid(shared, data, free_data) };
    };
    shared.deliver(Item::new(decode, data, free_data, None), wait_for(timeout_ms)).code()
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
    // SAFETY: the caller holds the handle (contract).
    let shared = unsafe { shared(handle) };
    let deadline = match wait_for(timeout_ms) {
        Wait::Forever => None,
        Wait::Until(deadline) => Some(deadline),
        // A round trip always waits for its reply; "do not wait" has no meaning here.
        Wait::No => return unsafe { invalid(shared, data, free_data) },
    };
    let (Some(shared), Some(decode), Some(result)) = (shared, decode, result) else {
        return unsafe { invalid(shared, data, free_data) };
    };
    shared.call(decode, result, data, free_data, deadline).code()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Instance;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    static FREED: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn count_free(_data: *mut c_void) {
        FREED.fetch_add(1, SeqCst);
    }

    unsafe extern "C-unwind" fn decode(_state: *mut c_void, _data: *mut c_void) -> c_int {
        0
    }

    unsafe extern "C-unwind" fn result(_state: *mut c_void, _data: *mut c_void, _n: c_int) {}

    #[test]
    fn invalid_arguments_free_the_data_and_say_so() {
        let instance = Instance::default();
        let handle = new_handle(instance.shared());
        let before = FREED.load(SeqCst);
        let invalid = Status::Invalid.code();
        let null: *mut c_void = std::ptr::null_mut();
        // SAFETY: `handle` is live until released at the end; NULL is allowed.
        unsafe {
            assert_eq!(deliver(null.cast(), Some(decode), null, Some(count_free), 0), invalid);
            assert_eq!(deliver(handle, None, null, Some(count_free), 0), invalid);
            assert_eq!(call(handle, Some(decode), None, null, Some(count_free), -1), invalid);
            assert_eq!(call(handle, Some(decode), Some(result), null, Some(count_free), 0), invalid);
            // Not started: refused, and still freed.
            assert_eq!(deliver(handle, Some(decode), null, Some(count_free), 0), Status::Closed.code());
            assert_eq!(FREED.load(SeqCst) - before, 5);
            release(handle);
            release(null.cast());
        }
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
    fn strerror_names_every_code() {
        let name = |c| unsafe { std::ffi::CStr::from_ptr(crate::status::strerror(c)) }.to_str().unwrap();
        assert_eq!(name(0), "BGW_OK");
        assert_eq!(name(6), "BGW_ERROR");
        assert_eq!(name(99), "BGW_UNKNOWN");
    }
}
