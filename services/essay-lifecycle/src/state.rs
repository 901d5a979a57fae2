//! The per-essay state machine. Every state change of an essay goes through
//! [`EssayState::apply`]; a transition it does not list is refused, so a stale or repeated
//! event cannot move an essay backwards.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EssayState {
    AwaitingContent,
    ContentReady,
    ContentFailed,
    /// No file arrived for the slot before the batch's provisioning deadline.
    ContentMissing,
    SpellcheckRequested,
    Spellchecked,
    SpellcheckFailed,
    CjRequested,
    CjCompleted,
    CjFailed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EssayEvent {
    ContentAssigned,
    ContentInvalid,
    ProvisioningDeadline,
    SpellcheckRequested,
    SpellcheckSucceeded,
    SpellcheckFailed,
    CjRequested,
    CjCompleted,
    CjFailed,
}

#[derive(Debug, PartialEq, Eq)]
pub struct InvalidTransition {
    pub from: EssayState,
    pub event: EssayEvent,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "essay in {:?} cannot take {:?}", self.from, self.event)
    }
}

impl std::error::Error for InvalidTransition {}

const ALL: [EssayState; 10] = [
    EssayState::AwaitingContent,
    EssayState::ContentReady,
    EssayState::ContentFailed,
    EssayState::ContentMissing,
    EssayState::SpellcheckRequested,
    EssayState::Spellchecked,
    EssayState::SpellcheckFailed,
    EssayState::CjRequested,
    EssayState::CjCompleted,
    EssayState::CjFailed,
];

impl EssayState {
    pub fn apply(self, event: EssayEvent) -> Result<Self, InvalidTransition> {
        use EssayEvent as E;
        use EssayState as S;
        Ok(match (self, event) {
            (S::AwaitingContent, E::ContentAssigned) => S::ContentReady,
            (S::AwaitingContent, E::ContentInvalid) => S::ContentFailed,
            (S::AwaitingContent, E::ProvisioningDeadline) => S::ContentMissing,
            (S::ContentReady, E::SpellcheckRequested) => S::SpellcheckRequested,
            (S::SpellcheckRequested, E::SpellcheckSucceeded) => S::Spellchecked,
            (S::SpellcheckRequested, E::SpellcheckFailed) => S::SpellcheckFailed,
            // CJ may run on spellchecked essays or, in a CJ-only pipeline, on ready ones; a
            // retried pipeline runs it again on the essays whose judgement failed.
            (S::ContentReady | S::Spellchecked | S::CjFailed, E::CjRequested) => S::CjRequested,
            (S::CjRequested, E::CjCompleted) => S::CjCompleted,
            (S::CjRequested, E::CjFailed) => S::CjFailed,
            (from, event) => return Err(InvalidTransition { from, event }),
        })
    }

    /// Still waiting for the current phase's answer.
    pub fn in_flight(self) -> bool {
        matches!(self, Self::SpellcheckRequested | Self::CjRequested)
    }

    pub fn failed(self) -> bool {
        matches!(
            self,
            Self::ContentFailed | Self::ContentMissing | Self::SpellcheckFailed | Self::CjFailed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingContent => "AWAITING_CONTENT",
            Self::ContentReady => "CONTENT_READY",
            Self::ContentFailed => "CONTENT_FAILED",
            Self::ContentMissing => "CONTENT_MISSING",
            Self::SpellcheckRequested => "SPELLCHECK_REQUESTED",
            Self::Spellchecked => "SPELLCHECKED",
            Self::SpellcheckFailed => "SPELLCHECK_FAILED",
            Self::CjRequested => "CJ_REQUESTED",
            Self::CjCompleted => "CJ_COMPLETED",
            Self::CjFailed => "CJ_FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL.into_iter().find(|st| st.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EssayEvent as E;
    use EssayState as S;

    #[test]
    fn the_happy_path_runs_through() {
        let s = S::AwaitingContent
            .apply(E::ContentAssigned)
            .and_then(|s| s.apply(E::SpellcheckRequested))
            .and_then(|s| s.apply(E::SpellcheckSucceeded))
            .and_then(|s| s.apply(E::CjRequested))
            .and_then(|s| s.apply(E::CjCompleted))
            .unwrap();
        assert_eq!(s, S::CjCompleted);
    }

    #[test]
    fn no_state_moves_backwards_or_twice() {
        assert!(
            S::Spellchecked.apply(E::SpellcheckSucceeded).is_err(),
            "a repeat is refused"
        );
        assert!(S::ContentReady.apply(E::ContentAssigned).is_err());
        assert!(
            S::ContentFailed.apply(E::SpellcheckRequested).is_err(),
            "failed content is never processed"
        );
        assert!(S::CjCompleted.apply(E::CjFailed).is_err());
        assert!(S::AwaitingContent.apply(E::CjRequested).is_err());
        assert_eq!(
            S::AwaitingContent.apply(E::ProvisioningDeadline),
            Ok(S::ContentMissing)
        );
        assert!(
            S::ContentReady.apply(E::ProvisioningDeadline).is_err(),
            "the deadline only ends waiting"
        );
        assert!(
            S::ContentMissing.apply(E::ContentAssigned).is_err(),
            "too late"
        );
        assert_eq!(S::ContentReady.apply(E::CjRequested), Ok(S::CjRequested));
        assert_eq!(
            S::CjFailed.apply(E::CjRequested),
            Ok(S::CjRequested),
            "a retry"
        );
        assert!(
            S::CjCompleted.apply(E::CjRequested).is_err(),
            "completed judgement is not redone"
        );
        // Exhaustive: every (state, event) pair either has a rule or is refused, and nothing
        // leads back to AwaitingContent.
        let events = [
            E::ContentAssigned,
            E::ContentInvalid,
            E::ProvisioningDeadline,
            E::SpellcheckRequested,
            E::SpellcheckSucceeded,
            E::SpellcheckFailed,
            E::CjRequested,
            E::CjCompleted,
            E::CjFailed,
        ];
        for s in ALL {
            assert_eq!(S::parse(s.as_str()), Some(s));
            for e in events {
                if let Ok(next) = s.apply(e) {
                    assert_ne!(next, S::AwaitingContent);
                    assert_ne!(next, s);
                }
            }
        }
    }
}
