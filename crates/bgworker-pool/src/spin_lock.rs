//! Taking a mutex that threads hold for a few hundred nanoseconds in turn
//! (the Lua thread and a pool's workers): by spinning first. A thread that
//! sleeps in the kernel for a lock makes its next unlock a system call, on
//! whichever thread unlocks, and that costs more than the wait it saves.

use std::hint::spin_loop;
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

/// Tries before sleeping for the lock: with the pauses between them, which
/// double up to 64 spins, a few microseconds.
const ROUNDS: u32 = 40;

/// Lock `mutex`, spinning first. A poisoned lock is taken as it is: its
/// users keep their state consistent at every point that could panic.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    for round in 0..ROUNDS {
        match mutex.try_lock() {
            Ok(guard) => return guard,
            Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => (0..1 << round.min(6)).for_each(|_| spin_loop()),
        }
    }
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn threads_that_spin_and_sleep_for_it_exclude_each_other() {
        let counter = Arc::new(Mutex::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = Arc::clone(&counter);
                thread::spawn(move || {
                    for _ in 0..50_000 {
                        *lock(&counter) += 1;
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(*lock(&counter), 200_000);
    }

    #[test]
    fn a_poisoned_lock_is_taken_as_it_is() {
        let mutex = Arc::new(Mutex::new(7));
        let poisoner = Arc::clone(&mutex);
        let _ = thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 7);
    }
}
