//! How long a thread may block: for room in a bounded queue (`room.rs`) and
//! for a round trip's reply (`reply.rs`). One deadline for both, so that a
//! round trip's `timeout_ms` bounds its whole wait.

use std::ffi::c_int;
use std::time::{Duration, Instant};

use crate::sync::{Condvar, MutexGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Do not block: the time is up already.
    No,
    Forever,
    Until(Instant),
}

impl Wait {
    /// The C contract's `timeout_ms`: `BGW_NOWAIT` (0), `BGW_FOREVER` (any
    /// negative value), or a number of milliseconds from now.
    pub fn from_timeout_ms(timeout_ms: c_int) -> Wait {
        match timeout_ms {
            0 => Wait::No,
            t if t < 0 => Wait::Forever,
            t => Wait::Until(Instant::now() + Duration::from_millis(t as u64)),
        }
    }

    /// Block on `condvar` until it is notified (or wakes spuriously: the
    /// caller re-checks its condition), releasing `guard` meanwhile. `Err`
    /// with the guard, without blocking, once the time is up.
    pub fn block<'a, T>(
        self,
        condvar: &Condvar,
        guard: MutexGuard<'a, T>,
    ) -> Result<MutexGuard<'a, T>, MutexGuard<'a, T>> {
        match self {
            Wait::No => Err(guard),
            Wait::Forever => Ok(condvar.wait(guard).unwrap_or_else(|e| e.into_inner())),
            Wait::Until(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => {
                    Ok(condvar.wait_timeout(guard, left).unwrap_or_else(|e| e.into_inner()).0)
                }
                _ => Err(guard),
            },
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn timeouts_from_c() {
        assert_eq!(Wait::from_timeout_ms(0), Wait::No);
        assert_eq!(Wait::from_timeout_ms(-1), Wait::Forever);
        assert_eq!(Wait::from_timeout_ms(c_int::MIN), Wait::Forever);
        assert!(matches!(Wait::from_timeout_ms(c_int::MAX), Wait::Until(_)));
    }

    #[test]
    fn an_expired_wait_never_blocks() {
        let (lock, condvar) = (Mutex::new(()), Condvar::new());
        assert!(Wait::No.block(&condvar, lock.lock().unwrap()).is_err());
        let past = Wait::Until(Instant::now() - Duration::from_millis(1));
        assert!(past.block(&condvar, lock.lock().unwrap()).is_err());
    }
}
