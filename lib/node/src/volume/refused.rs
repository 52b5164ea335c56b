//! Why a volume refused an operator's request, typed, so that the admin API can tell a
//! request that conflicts with the volume's role or state from one the volume cannot serve
//! now.

use super::AfterDrain;
use geomirror_core::{HostError, PromoteError, Role};
use std::fmt;
use std::time::Duration;
use thiserror::Error;

/// Why a promotion, drain, demotion or split-brain resolution was refused or abandoned.
/// The sentences are the operator's: the admin API and the CLI show them as they are.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Refused {
    #[error("{0}")]
    PeerAlive(PeerAlive),
    /// A promotion the core refuses (never paired, an amnesiac): only `force` overrides.
    #[error("{0}")]
    Promote(PromoteError),
    #[error("a secondary has nothing to drain")]
    NothingToDrain,
    /// A drain or demotion asked while one is under way.
    #[error("a demotion is already under way")]
    DrainUnderWay,
    /// A drain asked of a primary that is still persisting its new incarnation.
    #[error("cannot drain now: the primary is still starting; try again")]
    Starting,
    /// A drain asked of a primary that is fenced: a newer epoch exists.
    #[error("cannot drain now: the primary is fenced (a newer epoch exists elsewhere)")]
    Fenced,
    #[error("demotion refused: {0:?}")]
    DemotionRefused(HostError),
    #[error("the peer did not apply every write before the deadline (is the link up?); the volume serves again")]
    DrainDeadline,
    /// A drain or demotion ended by a resume before the peer had applied every write.
    #[error(
        "the {} was ended by a resume before the peer had applied every write; the volume serves again",
        match then { AfterDrain::Demote => "demotion", AfterDrain::Hold => "drain" }
    )]
    EndedByResume { then: AfterDrain },
    /// A promotion, once the role change was durable, found the volume of another role.
    #[error("the volume became {0:?} instead")]
    Became(Role),
    /// A demotion, once the role change was durable, found the volume still primary.
    #[error("the volume is still primary")]
    StillPrimary,
    #[error("no split brain is being held on this site (is the peer connected?)")]
    NoSplitBrain,
    #[error("run this on the site whose data you keep, the primary of the newer epoch")]
    NotTheKeeper,
    #[error("the volume has stopped")]
    Stopped,
    /// A verify asked of a secondary: the primary drives it (its reads are ordered against
    /// the host's writes).
    #[error("run verify on the primary: it reads its own image and the secondary compares in order")]
    VerifyOnSecondary,
    #[error("{0}")]
    Verify(geomirror_core::VerifyRefused),
    #[error("run this on the primary: it owes its peer the full sync")]
    ApproveOnSecondary,
    #[error("{0}")]
    Approve(geomirror_core::ApproveRefused),
}

/// Which kind of refusal: what the admin API answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request contradicts the volume's role or state, and is refused until they change.
    Conflict,
    /// The volume cannot serve it now: it is starting or stopping, or the peer did not
    /// apply what a drain waited for in time. The same request may succeed later.
    Unavailable,
}

impl Refused {
    pub fn kind(&self) -> RefusalKind {
        match self {
            Refused::Starting | Refused::DrainDeadline | Refused::Stopped => RefusalKind::Unavailable,
            Refused::PeerAlive(_)
            | Refused::Promote(_)
            | Refused::NothingToDrain
            | Refused::DrainUnderWay
            | Refused::Fenced
            | Refused::DemotionRefused(_)
            | Refused::EndedByResume { .. }
            | Refused::Became(_)
            | Refused::StillPrimary
            | Refused::NoSplitBrain
            | Refused::NotTheKeeper
            | Refused::VerifyOnSecondary
            | Refused::Verify(_)
            | Refused::ApproveOnSecondary
            | Refused::Approve(_) => RefusalKind::Conflict,
        }
    }
}

/// A promotion refused while the primary of `epoch` is connected: how long ago it was heard
/// from and how long a silence declares it lost (when the link said), so the operator knows
/// whether to wait or force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAlive {
    pub epoch: u64,
    /// How long ago the peer was last heard from, and the silence that declares it lost.
    pub heard: Option<(Duration, Duration)>,
}

impl fmt::Display for PeerAlive {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let epoch = self.epoch;
        let Some((ago, silence)) = self.heard else { return PromoteError::PeerAlive(epoch).fmt(f) };
        let left = silence.saturating_sub(ago);
        write!(
            f,
            "the primary of epoch {epoch} was last heard from {:.1} s ago; it is declared lost after {:.1} s of silence, in {:.1} s; promoting before then would make two writers: wait, or use --force",
            ago.as_secs_f64(),
            silence.as_secs_f64(),
            left.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VolumeConfig;
    use crate::store::MemoryStore;
    use crate::volume::Volume;
    use geomirror_core::{CoreConfig, Geometry, SiteState, StoreId};
    use std::sync::mpsc;

    fn start(dir: &std::path::Path, role: Role) -> (Volume, std::thread::JoinHandle<()>) {
        let cfg = VolumeConfig {
            name: "vol0".into(),
            media: dir.join("vol0.img"),
            geometry: Geometry::new(16 << 20, 1 << 20).unwrap(),
            description: String::new(),
            core: CoreConfig::default(),
        };
        Volume::start(&cfg, Box::new(MemoryStore::new(SiteState::fresh(role, StoreId(1)))), None).unwrap()
    }

    fn answer<T: Send + 'static>(ask: impl FnOnce(crate::volume::OperatorReply<T>)) -> Result<T, Refused> {
        let (tx, rx) = mpsc::channel();
        ask(Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap()
    }

    #[test]
    fn a_request_against_the_role_conflicts_and_one_to_a_stopped_volume_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let (v, driver) = start(dir.path(), Role::Secondary);
        let drained = answer(|r| v.drain(Duration::from_secs(1), r)).unwrap_err();
        assert_eq!((drained.kind(), drained.to_string()), (RefusalKind::Conflict, "a secondary has nothing to drain".to_owned()));
        let kept = answer(|r| v.resolve_split_brain(r)).unwrap_err();
        assert_eq!((kept.kind(), kept), (RefusalKind::Conflict, Refused::NotTheKeeper));
        // A new store has never paired: only force promotes it.
        let promoted = answer(|r| v.promote(false, r)).unwrap_err();
        assert_eq!((promoted.kind(), promoted), (RefusalKind::Conflict, Refused::Promote(PromoteError::NeverPaired)));
        v.stop();
        driver.join().unwrap();
        let stopped = answer(|r| v.promote(true, r)).unwrap_err();
        assert_eq!((stopped.kind(), stopped), (RefusalKind::Unavailable, Refused::Stopped));
    }

    #[test]
    fn a_peer_heard_from_says_when_it_will_be_declared_lost() {
        let quiet = PeerAlive { epoch: 3, heard: None };
        assert_eq!(quiet.to_string(), PromoteError::PeerAlive(3).to_string());
        let heard = PeerAlive { epoch: 3, heard: Some((Duration::from_millis(1200), Duration::from_secs(3))) };
        assert!(heard
            .to_string()
            .starts_with("the primary of epoch 3 was last heard from 1.2 s ago; it is declared lost after 3.0 s of silence, in 1.8 s;"));
    }
}
