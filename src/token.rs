//! Cancellation tokens: how a Lua state tells the threads of a utility
//! library that it gave up on work it asked for (a lookup nobody waits for
//! any more), so that they skip it or drop its result.
//!
//! A token is made on the Lua thread (`core.token()`), and shared as
//! counted references: the Lua userdata holds one, each `bgw_api.token_get`
//! hands out another (`bgw_token *` is an `Arc<Token>` turned into a raw
//! pointer), each released once. A token is cancelled by `token:cancel()`,
//! or when its Lua state closes: every token of a state shares its
//! [`Scope`], which the state closes from a finaliser.
//!
//! Invariant: both flags only ever go from false to true, and are read
//! with no lock, from any thread, also after the state closed (the
//! references keep the token and its scope alive).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What the tokens of one Lua state share: whether the state closed.
#[derive(Default)]
pub struct Scope {
    closed: AtomicBool,
}

impl Scope {
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

pub struct Token {
    cancelled: AtomicBool,
    scope: Arc<Scope>,
}

impl Token {
    pub fn new(scope: &Arc<Scope>) -> Token {
        Token { cancelled: AtomicBool::new(false), scope: Arc::clone(scope) }
    }

    /// Cancel: true the first time.
    pub fn cancel(&self) -> bool {
        !self.cancelled.swap(true, Ordering::AcqRel)
    }

    /// True once cancelled, or once its Lua state closed.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.scope.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_cancelled_once_or_by_its_scope() {
        let scope = Arc::new(Scope::default());
        let (first, second) = (Token::new(&scope), Token::new(&scope));
        assert!(!first.is_cancelled());
        assert!(first.cancel());
        assert!(!first.cancel(), "true the first time only");
        assert!(first.is_cancelled() && !second.is_cancelled());
        scope.close();
        assert!(second.is_cancelled(), "its state closed");
    }
}
