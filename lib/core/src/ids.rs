//! Identifier newtypes shared by every part of the core.
//!
//! Owns: the small `Copy + Ord` types that name epochs, sequence numbers, extents,
//! generations and host requests. Must not: carry behaviour beyond ordering and
//! arithmetic, so that a number can never be used in the wrong role.

use serde::{Deserialize, Serialize};

/// Fencing number, persisted on both sites and carried in every frame. Promotion bumps it;
/// a frame with a smaller epoch is refused, never applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch a promotion moves to.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

/// Position of a write in the primary's dispatch order. The secondary applies in this order.
/// `Seq(0)` means "nothing yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seq(pub u64);

impl Seq {
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

/// Index of an extent: the fixed, aligned region of the volume that the record tracks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExtentId(pub u64);

/// A batch of record entries added together. Assigned by the secondary, strictly increasing,
/// so a larger generation is always younger. Eviction drops whole generations, oldest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Generation(pub u64);

/// The shell's handle for one host request (an NBD handle, a simulated host's id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// The shell's handle for one store, media or read operation that the core asked for;
/// it comes back in the matching `handle_*_done` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Token(pub u64);

/// A store's identity: a random 128-bit number drawn when the store is created, never
/// changed. Each site remembers its peer's, so a peer that comes back with another identity
/// (its state directory lost or replaced) is recognised as an amnesiac, never trusted as the
/// store it paired with. Drawn by the shell (the core draws no randomness).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StoreId(pub u128);

impl std::str::FromStr for StoreId {
    type Err = String;
    /// The UUID layout as `Display` writes it (hyphens optional, hex in either case).
    fn from_str(s: &str) -> Result<StoreId, String> {
        let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a store id (32 hex digits, as status shows it: 8-4-4-4-12)"));
        }
        u128::from_str_radix(&hex, 16).map(StoreId).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl std::fmt::Display for StoreId {
    /// The UUID layout (8-4-4-4-12 hex digits), as operators see it in status and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(f, "{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}
