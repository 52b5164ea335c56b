//! The content digests a failback compares instead of copying an extent.
//!
//! Owns: how both sites digest an extent, block by block, so that equal content gives equal
//! digests and a difference names the blocks that differ. SHA-256 of each 4 KiB block,
//! truncated to 128 bits: an accidental collision would leave a block different on the two
//! sites with nothing to show for it, so a checksum (crc32c) is not enough here, while 128
//! bits keep the check of a 1 MiB extent at 4 KiB on the wire.

use sha2::{Digest, Sha256};

/// The unit a failback checks and copies: 4 KiB, the volume's own alignment.
pub const CHECK_BLOCK: u64 = 4096;

pub type BlockDigest = [u8; 16];

/// Number of check blocks in `len` bytes.
pub fn check_blocks(len: u64) -> usize {
    len.div_ceil(CHECK_BLOCK) as usize
}

/// The digests of an extent `len` bytes long whose content starts with `data`, one per
/// 4 KiB block; bytes past the end of `data` count as zeros (a short read of a sparse tail).
pub fn block_digests(data: &[u8], len: u64) -> Vec<BlockDigest> {
    let zeros = [0u8; CHECK_BLOCK as usize];
    (0..check_blocks(len))
        .map(|i| {
            let start = i as u64 * CHECK_BLOCK;
            let end = (start + CHECK_BLOCK).min(len);
            let n = (end - start) as usize;
            let have = data.get(start as usize..).map_or(&[][..], |d| &d[..d.len().min(n)]);
            let mut h = Sha256::new();
            h.update(have);
            h.update(&zeros[..n - have.len()]);
            let full: [u8; 32] = h.finalize().into();
            full[..16].try_into().expect("16 bytes")
        })
        .collect()
}

/// A bitmap of the blocks whose digests differ (bit `i % 8` of byte `i / 8`), all zero when
/// the content is equal. Lists of different lengths differ everywhere.
pub fn differing_blocks(mine: &[BlockDigest], theirs: &[BlockDigest]) -> Vec<u8> {
    let n = mine.len().max(theirs.len());
    let mut mask = vec![0u8; n.div_ceil(8)];
    for i in 0..n {
        if mine.len() != theirs.len() || mine[i] != theirs[i] {
            mask[i / 8] |= 1 << (i % 8);
        }
    }
    mask
}

/// Whether block `i` is set in a `differing_blocks` bitmap.
pub fn block_set(mask: &[u8], i: usize) -> bool {
    mask.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_content_equal_digests_and_a_difference_names_its_block() {
        let a = vec![7u8; 1 << 16];
        let da = block_digests(&a, 1 << 16);
        assert_eq!(da.len(), 16);
        assert!(differing_blocks(&da, &block_digests(&a.clone(), 1 << 16)).iter().all(|b| *b == 0));
        let mut b = a.clone();
        b[40_000] ^= 1;
        let mask = differing_blocks(&da, &block_digests(&b, 1 << 16));
        let set: Vec<usize> = (0..16).filter(|i| block_set(&mask, *i)).collect();
        assert_eq!(set, vec![40_000 / 4096]);
        // A short read is its zero-filled whole.
        let mut full = vec![0u8; 8192];
        full[..100].fill(3);
        assert_eq!(block_digests(&full[..100], 8192), block_digests(&full, 8192));
        // Lists of different lengths differ everywhere.
        assert!((0..16).all(|i| block_set(&differing_blocks(&da, &da[..8]), i)));
    }
}
