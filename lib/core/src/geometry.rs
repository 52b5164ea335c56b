//! Extent arithmetic: which extents a byte range covers.
//!
//! Owns: the volume size and the extent size, and the mapping from byte ranges to extents.
//! Must not: know about records or writes; it is pure arithmetic, checked once at build.

use crate::ids::ExtentId;
use std::ops::Range;
use thiserror::Error;

pub const MIN_EXTENT_BYTES: u64 = 64 * 1024;
pub const MAX_EXTENT_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_EXTENT_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error("extent size {0} bytes is not a power of two between 64 KiB and 64 MiB")]
    BadExtentSize(u64),
    #[error("volume size {0} bytes is not a positive multiple of 4096")]
    BadVolumeSize(u64),
    #[error("range at offset {offset} of {len} bytes is empty or runs past the volume end ({volume_bytes} bytes)")]
    OutOfRange { offset: u64, len: u64, volume_bytes: u64 },
}

/// A volume's size and its extent size. Extents are aligned; the last may be short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    volume_bytes: u64,
    extent_shift: u32,
}

impl Geometry {
    pub fn new(volume_bytes: u64, extent_bytes: u64) -> Result<Geometry, GeometryError> {
        if !extent_bytes.is_power_of_two() || !(MIN_EXTENT_BYTES..=MAX_EXTENT_BYTES).contains(&extent_bytes) {
            return Err(GeometryError::BadExtentSize(extent_bytes));
        }
        if volume_bytes == 0 || !volume_bytes.is_multiple_of(4096) {
            return Err(GeometryError::BadVolumeSize(volume_bytes));
        }
        Ok(Geometry { volume_bytes, extent_shift: extent_bytes.trailing_zeros() })
    }

    pub fn volume_bytes(&self) -> u64 {
        self.volume_bytes
    }

    pub fn extent_bytes(&self) -> u64 {
        1 << self.extent_shift
    }

    /// Number of extents, counting a short last one.
    pub fn extent_count(&self) -> u64 {
        self.volume_bytes.div_ceil(self.extent_bytes())
    }

    /// Checks that `[offset, offset+len)` is non-empty and inside the volume, without overflow.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), GeometryError> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.volume_bytes => Ok(()),
            _ => Err(GeometryError::OutOfRange { offset, len, volume_bytes: self.volume_bytes }),
        }
    }

    /// The extents that `[offset, offset+len)` touches. The range must have passed `check_range`.
    pub fn extents_of(&self, offset: u64, len: u64) -> Range<u64> {
        debug_assert!(self.check_range(offset, len).is_ok());
        let first = offset >> self.extent_shift;
        let last = (offset + len - 1) >> self.extent_shift;
        first..last + 1
    }

    /// The byte range of one extent, clipped at the volume end.
    pub fn extent_range(&self, e: ExtentId) -> Range<u64> {
        let start = e.0 << self.extent_shift;
        start..(start + self.extent_bytes()).min(self.volume_bytes)
    }

    pub fn contains(&self, e: ExtentId) -> bool {
        e.0 < self.extent_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_size_must_be_power_of_two_in_range() {
        assert!(Geometry::new(1 << 30, 1 << 20).is_ok());
        assert!(Geometry::new(1 << 30, 64 * 1024).is_ok());
        assert!(Geometry::new(1 << 30, 64 << 20).is_ok());
        assert_eq!(Geometry::new(1 << 30, 32 * 1024), Err(GeometryError::BadExtentSize(32 * 1024)));
        assert_eq!(Geometry::new(1 << 30, 128 << 20), Err(GeometryError::BadExtentSize(128 << 20)));
        assert_eq!(Geometry::new(1 << 30, 3 << 20), Err(GeometryError::BadExtentSize(3 << 20)));
        assert_eq!(Geometry::new(0, 1 << 20), Err(GeometryError::BadVolumeSize(0)));
        assert_eq!(Geometry::new(4097, 1 << 20), Err(GeometryError::BadVolumeSize(4097)));
    }

    #[test]
    fn extents_of_a_range() {
        let g = Geometry::new(10 << 20, 1 << 20).unwrap();
        assert_eq!(g.extents_of(0, 1), 0..1);
        assert_eq!(g.extents_of(0, 1 << 20), 0..1);
        assert_eq!(g.extents_of((1 << 20) - 1, 2), 0..2);
        assert_eq!(g.extents_of(3 << 20, 3 << 20), 3..6);
        assert_eq!(g.extent_count(), 10);
    }

    #[test]
    fn short_last_extent() {
        let g = Geometry::new((2 << 20) + 4096, 1 << 20).unwrap();
        assert_eq!(g.extent_count(), 3);
        assert_eq!(g.extent_range(ExtentId(2)), (2 << 20)..(2 << 20) + 4096);
    }

    #[test]
    fn range_checks_refuse_overflow_and_past_end() {
        let g = Geometry::new(1 << 20, 64 * 1024).unwrap();
        assert!(g.check_range(0, 1 << 20).is_ok());
        assert!(g.check_range(0, 0).is_err());
        assert!(g.check_range(1, 1 << 20).is_err());
        assert!(g.check_range(u64::MAX, 2).is_err());
        assert!(g.check_range(u64::MAX - 1, 1).is_err());
    }
}
