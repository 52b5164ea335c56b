//! The content digest a failback compares instead of copying an extent.
//!
//! Owns: one function, used by both sites, so that equal content gives equal digests. SHA-256
//! over the extent's length and bytes: a collision would leave an extent different on the two
//! sites with nothing to show for it, so a checksum (crc32c) is not enough here.

use sha2::{Digest, Sha256};

/// The digest of an extent `len` bytes long whose content starts with `data`; bytes past the
/// end of `data` count as zeros (a short read of a sparse tail).
pub fn extent_digest(data: &[u8], len: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let have = (data.len() as u64).min(len) as usize;
    h.update(&data[..have]);
    let zeros = [0u8; 4096];
    let mut left = len - have as u64;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_content_equal_digest_and_any_difference_shows() {
        let a = vec![7u8; 1 << 16];
        assert_eq!(extent_digest(&a, 1 << 16), extent_digest(&a.clone(), 1 << 16));
        let mut b = a.clone();
        b[40_000] ^= 1;
        assert_ne!(extent_digest(&a, 1 << 16), extent_digest(&b, 1 << 16));
        // A short read is its zero-filled whole; the length is part of the digest.
        let mut full = vec![0u8; 8192];
        full[..100].fill(3);
        assert_eq!(extent_digest(&full[..100], 8192), extent_digest(&full, 8192));
        assert_ne!(extent_digest(&full, 8192), extent_digest(&full[..4096], 4096));
    }
}
