//! The secondary's invariants, checked after every step: at the end of each `progress` in
//! builds with debug assertions, and after every event in the simulation, in any build.
//! Each names a bookkeeping fact ordered apply or the record relies on; a broken one is a
//! bug in the core, found at the step that broke it rather than by an oracle much later.
//! Must not: change any state.

use super::Secondary;
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
        // Generations are handed out in order: the record holds none not yet handed out.
        if let Some((e, g)) = self.record.iter().find(|(_, g)| *g >= self.next_generation) {
            return Err(format!("extent {} is recorded in generation {}, not below the next {}", e.0, g.0, self.next_generation.0));
        }
        if self.amnesiac && self.authoritative {
            return Err("an amnesiac's record is taken as authoritative".into());
        }
        Ok(())
    }
}
