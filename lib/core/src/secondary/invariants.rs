//! The secondary's invariants, checked after every step: at the end of each `progress` in
//! builds with debug assertions, and after every event in the simulation, in any build.
//! Each names a bookkeeping fact ordered apply or the record relies on; a broken one is a
//! bug in the core, found at the step that broke it rather than by an oracle much later.
//! Must not: change any state.

use super::{PersistKind, Secondary};
use crate::frame::Apply;

impl Secondary {
    /// Checks every invariant; the first broken one, described. Run at the end of each
    /// `progress` with debug assertions, and after every event in the simulation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let reordered: u64 = self.ordered.reorder.values().map(Apply::buffered_bytes).sum();
        if reordered != self.ordered.reorder_bytes {
            return Err(format!("the reorder buffer holds {reordered} bytes but counts {}", self.ordered.reorder_bytes));
        }
        if self.ordered.reorder_bytes > self.cfg.reorder_buffer_bytes {
            return Err(format!(
                "the reorder buffer holds {} bytes, over its {}",
                self.ordered.reorder_bytes, self.cfg.reorder_buffer_bytes
            ));
        }
        if self.durable_applied > self.applied {
            return Err(format!("durably applied {} past applied {}", self.durable_applied.0, self.applied.0));
        }
        // An image with extents found different from the primary's never claims consistency.
        if self.consistent && self.mismatch_open {
            return Err(format!("consistent while a check found extents different ({} divergent)", self.divergent.len()));
        }
        // Generations are handed out in order: the record holds none not yet handed out.
        if let Some((e, g)) = self.record.iter().find(|(_, g)| *g >= self.next_generation) {
            return Err(format!("extent {} is recorded in generation {}, not below the next {}", e.0, g.0, self.next_generation.0));
        }
        self.records.queue.check()?;
        // The batch being persisted and what blocks applying are each a store write (or a
        // check's read) still outstanding: otherwise nothing would ever release them.
        if let Some((t, _, _)) = &self.records.persisting {
            if self.persists.get(t) != Some(&PersistKind::Record) {
                return Err(format!("the record batch {} being persisted is not an outstanding record write", t.0));
            }
        }
        if let Some(t) = self.ordered.blocked {
            if !self.persists.contains_key(&t) && self.ordered.verifying.map(|v| v.0) != Some(t) {
                return Err(format!("applying is blocked by {}, neither an outstanding store write nor a check", t.0));
            }
        }
        if self.amnesiac && self.authoritative {
            return Err("an amnesiac's record is taken as authoritative".into());
        }
        Ok(())
    }
}
