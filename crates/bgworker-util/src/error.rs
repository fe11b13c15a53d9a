use std::ffi::c_int;
use std::fmt;

/// Why a delivery or round trip did not happen, one variant per return code
/// of the C contract (`enum bgw_status`), plus [`Error::NotLoaded`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// `bgworker.core` is not loaded in the Lua state (or speaks another major
    /// version of the C API, or the state's instance is closed).
    NotLoaded,
    /// `BGW_FULL`: the bounded queue is full and the call was not to wait.
    Full,
    /// `BGW_CLOSED`: the dispatcher is stopped, or the Lua state is closed.
    Closed,
    /// `BGW_TIMEOUT`: no room in the queue in time, or (for a round trip) no
    /// reply in time.
    Timeout,
    /// `BGW_INVALID`: the core refused the arguments. This crate never passes
    /// invalid ones; kept so that every code has a variant.
    Invalid,
    /// `BGW_CANCELLED`: the round trip was cancelled (the dispatcher stopped,
    /// or the state closed) before its callback ran to the end.
    Cancelled,
    /// `BGW_ERROR` (round trips only): a Lua error. `Some` holds the message
    /// when it was raised on this side: by the closure, or by converting the
    /// callback's values. `None` when the callback itself raised: its error
    /// went to the dispatcher's error handler, not to us.
    Lua(Option<String>),
    /// A return code this crate does not know (a newer bgworker).
    Unknown(c_int),
}

impl Error {
    /// The error for a return code of the C API; `Ok` for `BGW_OK`.
    pub(crate) fn check(code: c_int) -> Result<(), Error> {
        Err(match code {
            0 => return Ok(()),
            1 => Error::Full,
            2 => Error::Closed,
            3 => Error::Timeout,
            4 => Error::Invalid,
            5 => Error::Cancelled,
            6 => Error::Lua(None),
            other => Error::Unknown(other),
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotLoaded => f.write_str("bgworker.core is not loaded in this Lua state"),
            Error::Full => f.write_str("the bgworker queue is full"),
            Error::Closed => f.write_str("the bgworker dispatcher is stopped or its Lua state is closed"),
            Error::Timeout => f.write_str("timed out"),
            Error::Invalid => f.write_str("bgworker refused the arguments"),
            Error::Cancelled => f.write_str("cancelled before the callback completed"),
            Error::Lua(Some(message)) => write!(f, "Lua error: {message}"),
            Error::Lua(None) => f.write_str("the callback raised a Lua error (reported by the dispatcher)"),
            Error::Unknown(code) => write!(f, "unknown bgworker return code {code}"),
        }
    }
}

impl std::error::Error for Error {}

/// So that a library's `luaopen` can use `?` on [`crate::Sender::new`].
impl From<Error> for mlua::Error {
    fn from(error: Error) -> Self {
        mlua::Error::external(error)
    }
}
