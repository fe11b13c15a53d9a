//! The return codes of the C contract (`enum bgw_status` in include/bgworker.h).

use std::ffi::{c_char, c_int, CStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub enum Status {
    Ok = 0,
    Full = 1,
    Closed = 2,
    Timeout = 3,
    Invalid = 4,
    Cancelled = 5,
    Error = 6,
}

impl Status {
    pub fn code(self) -> c_int {
        self as c_int
    }

    pub fn name(code: c_int) -> &'static CStr {
        match code {
            0 => c"BGW_OK",
            1 => c"BGW_FULL",
            2 => c"BGW_CLOSED",
            3 => c"BGW_TIMEOUT",
            4 => c"BGW_INVALID",
            5 => c"BGW_CANCELLED",
            6 => c"BGW_ERROR",
            _ => c"BGW_UNKNOWN",
        }
    }
}

/// `const char *strerror(int code)` of the C API.
pub extern "C" fn strerror(code: c_int) -> *const c_char {
    Status::name(code).as_ptr()
}
