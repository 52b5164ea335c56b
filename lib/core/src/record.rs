//! The record: the set of extents where the sites may differ or soon will.
//!
//! Owns: a bitmap over the volume's extents (claim 9) with each member tagged by the
//! generation it was added in (claim 16), and the index from generation to members that
//! makes "evict the oldest whole generation" cheap. The same type is the secondary's durable
//! record and the primary's record copy.
//! Must not: decide anything. Policy (what to add, what to evict) lives in `predict`,
//! `primary` and `secondary`; this file only keeps the set consistent with its index.

use crate::ids::{ExtentId, Generation};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A run of consecutive extents, the unit in which extent sets travel in frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentRun {
    pub start: u64,
    pub len: u32,
}

/// Packs a sorted, de-duplicated extent list into runs.
pub fn to_runs<I: IntoIterator<Item = ExtentId>>(extents: I) -> Vec<ExtentRun> {
    let mut runs: Vec<ExtentRun> = Vec::new();
    for e in extents {
        match runs.last_mut() {
            Some(r) if r.start + r.len as u64 == e.0 && r.len < u32::MAX => r.len += 1,
            _ => runs.push(ExtentRun { start: e.0, len: 1 }),
        }
    }
    runs
}

/// Expands runs back into extents. Runs come from the network, so the caller bounds the total
/// first with `runs_len`.
pub fn from_runs(runs: &[ExtentRun]) -> impl Iterator<Item = ExtentId> + '_ {
    runs.iter().flat_map(|r| (r.start..r.start.saturating_add(r.len as u64)).map(ExtentId))
}

/// Total extents named by `runs`, saturating.
pub fn runs_len(runs: &[ExtentRun]) -> u64 {
    runs.iter().fold(0u64, |acc, r| acc.saturating_add(r.len as u64))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    bits: Vec<u64>,
    extent_count: u64,
    members: BTreeMap<ExtentId, Generation>,
    by_generation: BTreeMap<Generation, BTreeSet<ExtentId>>,
}

impl Record {
    pub fn new(extent_count: u64) -> Record {
        Record { bits: vec![0; extent_count.div_ceil(64) as usize], extent_count, members: BTreeMap::new(), by_generation: BTreeMap::new() }
    }

    pub fn extent_count(&self) -> u64 {
        self.extent_count
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn contains(&self, e: ExtentId) -> bool {
        e.0 < self.extent_count && self.bits[(e.0 / 64) as usize] & (1 << (e.0 % 64)) != 0
    }

    pub fn generation_of(&self, e: ExtentId) -> Option<Generation> {
        self.members.get(&e).copied()
    }

    /// Adds `e` in generation `g`, or moves it there if it is already a member of an older one
    /// (a re-added extent is young again). Returns false for an extent outside the volume.
    pub fn insert(&mut self, e: ExtentId, g: Generation) -> bool {
        if e.0 >= self.extent_count {
            return false;
        }
        if let Some(old) = self.members.insert(e, g) {
            self.unindex(e, old);
        }
        self.by_generation.entry(g).or_default().insert(e);
        self.bits[(e.0 / 64) as usize] |= 1 << (e.0 % 64);
        true
    }

    /// Removes `e`, returning the generation it had.
    pub fn remove(&mut self, e: ExtentId) -> Option<Generation> {
        let g = self.members.remove(&e)?;
        self.unindex(e, g);
        self.bits[(e.0 / 64) as usize] &= !(1 << (e.0 % 64));
        Some(g)
    }

    /// Removes `e` only if it is still tagged with `g` or older: an eviction instruction
    /// for generation `g` must not remove an extent that was re-added in a younger generation
    /// after the primary decided to evict.
    pub fn remove_if_not_younger(&mut self, e: ExtentId, g: Generation) -> bool {
        match self.members.get(&e) {
            Some(&tag) if tag <= g => {
                self.remove(e);
                true
            }
            _ => false,
        }
    }

    fn unindex(&mut self, e: ExtentId, g: Generation) {
        if let Some(set) = self.by_generation.get_mut(&g) {
            set.remove(&e);
            if set.is_empty() {
                self.by_generation.remove(&g);
            }
        }
    }

    /// Members in extent order with their generation.
    pub fn iter(&self) -> impl Iterator<Item = (ExtentId, Generation)> + '_ {
        self.members.iter().map(|(e, g)| (*e, *g))
    }

    /// Generations from oldest to youngest, each with its members.
    pub fn generations(&self) -> impl Iterator<Item = (Generation, &BTreeSet<ExtentId>)> + '_ {
        self.by_generation.iter().map(|(g, s)| (*g, s))
    }

    pub fn generation_count(&self) -> usize {
        self.by_generation.len()
    }

    pub fn members_of(&self, g: Generation) -> Option<&BTreeSet<ExtentId>> {
        self.by_generation.get(&g)
    }

    pub fn clear(&mut self) {
        *self = Record::new(self.extent_count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_generations() {
        let mut r = Record::new(100);
        assert!(r.insert(ExtentId(3), Generation(1)));
        assert!(r.insert(ExtentId(4), Generation(1)));
        assert!(r.insert(ExtentId(70), Generation(2)));
        assert!(!r.insert(ExtentId(100), Generation(2)), "outside the volume");
        assert!(r.contains(ExtentId(70)) && !r.contains(ExtentId(5)));
        assert_eq!(r.len(), 3);
        assert_eq!(r.generations().map(|(g, s)| (g, s.len())).collect::<Vec<_>>(), vec![(Generation(1), 2), (Generation(2), 1)]);
        // Re-adding moves the extent to the younger generation.
        r.insert(ExtentId(3), Generation(3));
        assert_eq!(r.generation_of(ExtentId(3)), Some(Generation(3)));
        assert_eq!(r.members_of(Generation(1)).unwrap().len(), 1);
        assert_eq!(r.remove(ExtentId(4)), Some(Generation(1)));
        assert!(r.members_of(Generation(1)).is_none(), "an emptied generation disappears");
        assert!(!r.contains(ExtentId(4)));
    }

    #[test]
    fn eviction_spares_younger_re_adds() {
        let mut r = Record::new(10);
        r.insert(ExtentId(1), Generation(5));
        assert!(!r.remove_if_not_younger(ExtentId(1), Generation(4)));
        assert!(r.contains(ExtentId(1)));
        assert!(r.remove_if_not_younger(ExtentId(1), Generation(5)));
        assert!(!r.contains(ExtentId(1)));
    }

    #[test]
    fn runs_round_trip() {
        let ext = [1u64, 2, 3, 7, 9, 10].map(ExtentId);
        let runs = to_runs(ext);
        assert_eq!(runs, vec![ExtentRun { start: 1, len: 3 }, ExtentRun { start: 7, len: 1 }, ExtentRun { start: 9, len: 2 }]);
        assert_eq!(from_runs(&runs).collect::<Vec<_>>(), ext.to_vec());
        assert_eq!(runs_len(&runs), 6);
    }
}
