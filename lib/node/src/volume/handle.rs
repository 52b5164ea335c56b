//! The handle to a running volume: what NBD connections, the link and the admin API hold.
//!
//! Owns: starting a volume, and handing its driver each request in order (a request to a
//! stopped driver is answered, never dropped). Reads and checksums run on the caller's
//! thread, straight from the media.
//!
//! Must not: touch the core; only the driver thread does.

use super::driver;
use super::{AfterDrain, Completion, Drained, LinkEvent, OperatorReply, Outbound, PromoteOutcome, Refused, ToDriver, VolumeStatus};
use crate::config::VolumeConfig;
use crate::media::{Media, MediaError};
use crate::store::Store;
use bytes::Bytes;
use geomirror_core::{Geometry, HostError, Role, SiteState, WriteOp};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Plain counters of one volume, for status and (later) metrics.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub media_errors: AtomicU64,
}

/// A handle to a running volume; cheap to clone, shared by all its connections.
#[derive(Clone)]
pub struct Volume {
    tx: mpsc::Sender<ToDriver>,
    media: Arc<Media>,
    description: Arc<str>,
    media_path: Arc<std::path::Path>,
    shared: Shared,
}

/// What a volume's handles and its driver thread both hold.
#[derive(Clone)]
pub(super) struct Shared {
    pub name: Arc<str>,
    /// Set once the volume failed: every request fails from then on.
    pub failed: Arc<AtomicBool>,
    /// True while the volume is a primary: only then do hosts read or write it.
    pub serving: Arc<AtomicBool>,
    /// The volume's role, for the link (a primary connects to its peer).
    pub role: Arc<tokio::sync::watch::Sender<Role>>,
    pub counters: Arc<VolumeCounters>,
}

impl Volume {
    /// Opens the media and starts the driver, store and sync threads. The store's role decides
    /// whether the volume serves hosts (primary) or applies its peer's writes (secondary).
    /// Frames for the peer go to `outbox`; a volume without a link has none.
    pub fn start(
        cfg: &VolumeConfig,
        store: Box<dyn Store>,
        outbox: Option<tokio::sync::mpsc::UnboundedSender<Outbound>>,
    ) -> Result<(Volume, JoinHandle<()>), MediaError> {
        let media = Arc::new(Media::open(&cfg.media, cfg.geometry.volume_bytes())?);
        let state: SiteState = store.load();
        let shared = Shared {
            name: cfg.name.as_str().into(),
            failed: Arc::new(AtomicBool::new(false)),
            serving: Arc::new(AtomicBool::new(state.role == Role::Primary)),
            role: Arc::new(tokio::sync::watch::Sender::new(state.role)),
            counters: Arc::new(VolumeCounters::default()),
        };
        let (tx, handle) = driver::start(cfg, &state, store, media.clone(), outbox, shared.clone());
        let volume = Volume { tx, media, description: cfg.description.as_str().into(), media_path: cfg.media.as_path().into(), shared };
        Ok((volume, handle))
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    pub fn size_bytes(&self) -> u64 {
        self.media.size_bytes()
    }
    pub fn counters(&self) -> &VolumeCounters {
        &self.shared.counters
    }

    /// Bytes of the media that hold data (`SEEK_DATA`; a block device counts whole). Blocking.
    pub fn allocated_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::metadata(&self.media_path)?.file_type().is_block_device() {
            return Ok(self.size_bytes());
        }
        crate::media::allocated_bytes(&self.media_path)
    }

    /// The side files of past failbacks (`<media>.aside.e<epoch>`) and their extent counts.
    pub fn aside_files(&self) -> Vec<(std::path::PathBuf, u64)> {
        crate::aside::Aside::list(&self.media_path)
    }

    /// The volume's role now, and each change of it.
    pub fn watch_role(&self) -> tokio::sync::watch::Receiver<Role> {
        self.shared.role.subscribe()
    }

    /// Submits a write; `done` is called when the core acknowledges or fails it.
    pub fn write(&self, op: WriteOp, fua: bool, done: Completion) {
        self.shared.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.write_bytes.fetch_add(op.payload_bytes(), Ordering::Relaxed);
        self.submit(ToDriver::Write { op, fua, done, at: Instant::now() });
    }

    /// Hands the volume an event of its link.
    pub fn link(&self, event: LinkEvent) {
        let _ = self.tx.send(ToDriver::Link(event));
    }

    /// Calls `f` with a snapshot of the volume, from its driver thread.
    pub fn status(&self, f: impl FnOnce(VolumeStatus) + Send + 'static) {
        let _ = self.tx.send(ToDriver::Status(Box::new(f)));
    }

    /// Calls `f` once this volume, as primary, has nothing waiting, in flight or unapplied
    /// on its peer: the two images are equal. On a secondary or a fenced primary, at once.
    pub fn when_drained(&self, f: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(ToDriver::WhenDrained(Box::new(f)));
    }

    /// Promotes a secondary (see `Secondary::promote`); `reply` gets the outcome once the
    /// new role is durable and serving. Idempotent: a primary answers `AlreadyPrimary`.
    pub fn promote(&self, force: bool, reply: OperatorReply<PromoteOutcome>) {
        self.submit(ToDriver::Promote { force, reply });
    }

    /// Planned demotion of a primary: stops accepting writes, waits (up to `deadline`) until
    /// the peer has applied everything, then becomes a secondary of the same epoch. On
    /// timeout the drain ends and the volume serves again.
    pub fn demote(&self, deadline: Duration, reply: OperatorReply<Drained>) {
        self.submit(ToDriver::Drain { deadline, then: AfterDrain::Demote, reply });
    }

    /// Stops accepting writes and waits (up to `deadline`) until the peer has applied
    /// everything; the volume stays drained until `resume` or a demotion.
    pub fn drain(&self, deadline: Duration, reply: OperatorReply<Drained>) {
        self.submit(ToDriver::Drain { deadline, then: AfterDrain::Hold, reply });
    }

    /// After a split brain, keeps this (primary) site's data: see `Primary::resolve_split_brain`.
    pub fn resolve_split_brain(&self, reply: OperatorReply<()>) {
        self.submit(ToDriver::ResolveSplitBrain { reply });
    }

    /// Starts an online verify of extents `extents` (see `Primary::start_verify`): the peer
    /// compares each extent's digests at its place in the write order. Progress and what it
    /// found are in the status.
    pub fn verify(&self, extents: std::ops::Range<u64>, repair: bool, reply: OperatorReply<()>) {
        self.submit(ToDriver::Verify { extents, repair, reply });
    }

    /// Approves the full sync onto the peer store `store`, which must be the one waiting
    /// (see `Primary::approve_rebuild`).
    pub fn approve_rebuild(&self, store: geomirror_core::StoreId, reply: OperatorReply<()>) {
        self.submit(ToDriver::ApproveRebuild { store, reply });
    }

    /// Stops a running verify; its findings stay.
    pub fn cancel_verify(&self, reply: OperatorReply<bool>) {
        self.submit(ToDriver::CancelVerify { reply });
    }

    /// Ends a drain: the volume takes writes again.
    pub fn resume(&self) {
        self.submit(ToDriver::Resume);
    }

    /// CRC-32C of each extent's content on this site's media (blocking; off the async
    /// threads). With the volume drained, both sites' answers must agree.
    pub fn checksums(&self, extents: &[u64], extent_bytes: u64) -> Result<Vec<u32>, HostError> {
        // Every extent is checked by the geometry before any is read: an extent number times
        // the extent size may wrap around to another extent.
        let geo = Geometry::new(self.media.size_bytes(), extent_bytes).map_err(|_| HostError::OutOfRange)?;
        if extents.iter().any(|e| !geo.contains(geomirror_core::ExtentId(*e))) {
            return Err(HostError::OutOfRange);
        }
        let mut buf = vec![0u8; geo.extent_bytes() as usize];
        let mut out = Vec::with_capacity(extents.len());
        for e in extents {
            let range = geo.extent_range(geomirror_core::ExtentId(*e));
            let len = (range.end - range.start) as usize;
            self.media.read_at(&mut buf[..len], range.start).map_err(|_| HostError::Media)?;
            out.push(crc32c::crc32c(&buf[..len]));
        }
        Ok(out)
    }

    pub fn flush(&self, done: Completion) {
        self.shared.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.submit(ToDriver::Flush { done });
    }

    fn submit(&self, input: ToDriver) {
        if let Err(mpsc::SendError(input)) = self.tx.send(input) {
            // The driver has stopped: the request is answered, never dropped.
            match input {
                ToDriver::Write { done, .. } | ToDriver::Flush { done } => done(Err(HostError::NotServing)),
                ToDriver::Promote { reply, .. } => reply(Err(Refused::Stopped)),
                ToDriver::Drain { reply, .. } => reply(Err(Refused::Stopped)),
                ToDriver::ResolveSplitBrain { reply } | ToDriver::Verify { reply, .. } | ToDriver::ApproveRebuild { reply, .. } => {
                    reply(Err(Refused::Stopped))
                }
                ToDriver::CancelVerify { reply } => reply(Err(Refused::Stopped)),
                ToDriver::Synced { .. }
                | ToDriver::Persisted { .. }
                | ToDriver::Stop
                | ToDriver::Link(_)
                | ToDriver::Status(_)
                | ToDriver::WhenDrained(_)
                | ToDriver::Resume => {}
            }
        }
    }

    /// Reads from the media. Blocking: call it off the async threads. Reads see every write
    /// acknowledged before they were issued, since acknowledgement follows the media write.
    pub fn read(&self, offset: u64, len: u32) -> Result<Bytes, HostError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(HostError::Media);
        }
        if !self.shared.serving.load(Ordering::Acquire) {
            // A secondary's image is mid-apply: hosts read it only after a promotion.
            return Err(HostError::NotServing);
        }
        let mut buf = vec![0u8; len as usize];
        self.shared.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
        match self.media.read_at(&mut buf, offset) {
            Ok(()) => Ok(Bytes::from(buf)),
            Err(e) => {
                self.shared.counters.media_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(volume = %self.shared.name, offset, len, error = %e, "media read failed");
                Err(HostError::Media)
            }
        }
    }

    /// Asks the driver to finish accepted requests, sync the media and end.
    pub fn stop(&self) {
        let _ = self.tx.send(ToDriver::Stop);
    }
}
