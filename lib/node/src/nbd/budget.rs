//! The bytes NBD requests may hold in memory, over all connections of a site.
//!
//! Owns: the accounting of what requests read and not yet answered hold (a write's payload
//! until the volume has applied it, a read's data until it is on the socket, and a small
//! cost for every other reply still owed, replies waiting for a client that does not read
//! included), the site's limit (`[nbd] max_inflight_bytes`), each connection's bound
//! (`max_inflight_bytes_per_connection`) and guaranteed share
//! (`GUARANTEED_BYTES_PER_CONNECTION`), and the counters the metrics read.
//!
//! Must not: touch sockets or volumes. The server says what a request costs, and stops
//! reading a connection while its `ConnectionBudget::take` waits: that wait is the
//! backpressure. Nothing here fails or drops a request; a request that was read always got
//! its bytes first.
//!
//! How the site's budget is split, and why. A client that sends requests and never reads
//! the replies pins what those requests hold until it reads or goes away, and nothing the
//! server can do frees it without dropping replies it owes. So the limit is split: every
//! connection slot (`max_connections` of them) owns a guaranteed share that no other
//! connection can take, and the rest is a shared pool that any connection borrows from, up
//! to its own bound. Stuck clients, however many, pin at most their own shares and the
//! shared pool; a client that reads its replies always has its share, so its requests of
//! up to the share's size keep being served. The other option, closing a connection whose
//! replies are not read for some time, drops replies for requests already executed,
//! cannot tell a stuck client from a slow one, and leaves every other client waiting for
//! the whole timeout; it was not chosen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What each connection can always have in flight, whatever other connections hold. 2 MiB
/// covers the requests common clients send (nbdcopy's 256 KiB, the Linux block layer's
/// default largest request of 1.25 MiB, qemu-img convert's 2 MiB) and keeps the shares of
/// the default 64 connections at 128 MiB. Larger requests borrow from the shared pool.
pub const GUARANTEED_BYTES_PER_CONNECTION: u32 = 2 << 20;

/// The counters of the site's budget, for status and metrics.
#[derive(Debug, Default)]
pub struct BudgetCounters {
    /// Bytes held now by requests read and not yet answered.
    pub held_bytes: AtomicU64,
    /// The most `held_bytes` has been since the site started.
    pub peak_bytes: AtomicU64,
    /// The site's limit, `max_inflight_bytes`.
    pub limit_bytes: AtomicU64,
    /// Requests that found no room in the site's budget (neither their connection's share
    /// nor the shared pool) and waited, their connection unread meanwhile.
    pub exhausted_site: AtomicU64,
    /// Requests that waited because their connection already held its bound.
    pub exhausted_connection: AtomicU64,
}

/// The site's budget: the shared pool and the size of each connection's share.
pub struct SiteBudget {
    shared: Arc<Semaphore>,
    share_bytes: u32,
    counters: Arc<BudgetCounters>,
}

impl SiteBudget {
    /// `limit` bytes in all, of which each of `connections` slots owns `share_bytes`. The
    /// config check makes sure the shared rest holds at least one largest request.
    pub fn new(limit: u64, connections: usize, share_bytes: u32, counters: Arc<BudgetCounters>) -> SiteBudget {
        let reserved = connections as u64 * share_bytes as u64;
        assert!(limit > reserved, "max_inflight_bytes ({limit}) must exceed the guaranteed shares ({reserved}); the config check says so");
        counters.limit_bytes.store(limit, Ordering::Relaxed);
        SiteBudget { shared: Arc::new(Semaphore::new((limit - reserved) as usize)), share_bytes, counters }
    }

    /// The budget of a new connection: its bound and its share. The server makes at most
    /// `connections` of them at once (one per slot), so the shares never exceed what was
    /// set aside for them.
    pub fn connection(&self, bound_bytes: u64) -> ConnectionBudget {
        ConnectionBudget {
            bound: Arc::new(Semaphore::new(bound_bytes as usize)),
            share: Arc::new(Semaphore::new(self.share_bytes as usize)),
            shared: self.shared.clone(),
            share_bytes: self.share_bytes,
            counters: self.counters.clone(),
        }
    }
}

/// One connection's part of the site's budget.
pub struct ConnectionBudget {
    bound: Arc<Semaphore>,
    share: Arc<Semaphore>,
    shared: Arc<Semaphore>,
    share_bytes: u32,
    counters: Arc<BudgetCounters>,
}

impl ConnectionBudget {
    /// Takes `cost` bytes, waiting while the connection holds its bound or the site has no
    /// room for it. A request that fits the connection's share uses the share first, so that
    /// the shared pool stays for larger requests and busier connections.
    pub async fn take(&self, cost: u32) -> Held {
        let bound = match self.bound.clone().try_acquire_many_owned(cost) {
            Ok(p) => p,
            Err(_) => {
                self.counters.exhausted_connection.fetch_add(1, Ordering::Relaxed);
                self.bound.clone().acquire_many_owned(cost).await.expect("a budget is never closed")
            }
        };
        let site = self.take_site(cost).await;
        let held = self.counters.held_bytes.fetch_add(cost as u64, Ordering::Relaxed) + cost as u64;
        self.counters.peak_bytes.fetch_max(held, Ordering::Relaxed);
        Held { bound, site, counters: self.counters.clone() }
    }

    async fn take_site(&self, cost: u32) -> OwnedSemaphorePermit {
        let fits_share = cost <= self.share_bytes;
        if fits_share {
            if let Ok(p) = self.share.clone().try_acquire_many_owned(cost) {
                return p;
            }
        }
        if let Ok(p) = self.shared.clone().try_acquire_many_owned(cost) {
            return p;
        }
        self.counters.exhausted_site.fetch_add(1, Ordering::Relaxed);
        // Both waits queue in their semaphore's order; the one that loses the race is
        // dropped, which hands back anything it had been given.
        let permit = if fits_share {
            tokio::select! {
                p = self.share.clone().acquire_many_owned(cost) => p,
                p = self.shared.clone().acquire_many_owned(cost) => p,
            }
        } else {
            self.shared.clone().acquire_many_owned(cost).await
        };
        permit.expect("a budget is never closed")
    }
}

/// Bytes a request holds, given back when it is dropped (when its reply has been written).
pub struct Held {
    bound: OwnedSemaphorePermit,
    site: OwnedSemaphorePermit,
    counters: Arc<BudgetCounters>,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bound.num_permits()
    }

    /// Gives back all but `keep` bytes: a write whose payload the volume no longer needs
    /// keeps only the cost of the reply it still owes.
    pub fn shrink_to(&mut self, keep: u32) {
        let give = self.bytes().saturating_sub(keep as usize);
        if give == 0 {
            return;
        }
        self.counters.held_bytes.fetch_sub(give as u64, Ordering::Relaxed);
        drop(self.bound.split(give));
        drop(self.site.split(give));
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Counted down before the permits go back, so `held_bytes` never exceeds the limit.
        self.counters.held_bytes.fetch_sub(self.bytes() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;

    const MIB: u32 = 1 << 20;

    /// Polls `f` once: its output if it is ready now, None if it would wait.
    async fn now<F: Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = f => Some(out),
            _ = std::future::ready(()) => None,
        }
    }

    fn site(limit_mib: u64, connections: usize) -> (SiteBudget, Arc<BudgetCounters>) {
        let counters = Arc::new(BudgetCounters::default());
        (SiteBudget::new(limit_mib << 20, connections, 2 * MIB, counters.clone()), counters)
    }

    #[tokio::test]
    async fn stuck_connections_pin_at_most_their_shares_and_the_pool_and_a_reading_one_goes_on() {
        // 4 slots of 2 MiB and a 24 MiB pool.
        let (site, counters) = site(32, 4);
        let stuck: Vec<ConnectionBudget> = (0..3).map(|_| site.connection(64 << 20)).collect();
        // Each stuck client takes what it can and keeps it: the first its share and 14 MiB
        // of the pool, the second its share and the pool's last 10 MiB, the third its share.
        let mut pinned: Vec<Vec<Held>> = Vec::new();
        for c in &stuck {
            let mut mine = Vec::new();
            for _ in 0..16 {
                let mut next = pin!(c.take(MIB));
                match now(next.as_mut()).await {
                    Some(h) => mine.push(h),
                    None => break,
                }
            }
            pinned.push(mine);
        }
        assert_eq!(pinned.iter().map(Vec::len).collect::<Vec<_>>(), [16, 12, 2]);
        let held: usize = pinned.iter().flatten().map(Held::bytes).sum();
        assert_eq!(held, (3 * 2 + 24) << 20, "three shares and the whole pool");
        assert_eq!(counters.held_bytes.load(Ordering::Relaxed), held as u64);
        assert!(counters.exhausted_site.load(Ordering::Relaxed) >= 1);

        // A client that reads its replies: each request goes through on its share at once.
        let good = site.connection(64 << 20);
        for _ in 0..10 {
            let h = now(pin!(good.take(MIB))).await.expect("served from the share");
            let h2 = now(pin!(good.take(MIB))).await.expect("the share holds two");
            drop((h, h2));
        }
        // A request larger than the share waits for the pool, and gets it when a stuck
        // client reads replies that held pool bytes (its last four).
        let mut large = pin!(good.take(4 * MIB));
        assert!(now(large.as_mut()).await.is_none());
        pinned[0].truncate(12);
        let h = now(large.as_mut()).await.expect("the pool has room again");
        assert_eq!(h.bytes(), 4 << 20);
        assert!(counters.peak_bytes.load(Ordering::Relaxed) <= 32 << 20, "never over the limit");
        drop(h);
        drop(pinned);
        assert_eq!(counters.held_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_connection_waits_at_its_bound_and_a_shrunk_write_gives_its_payload_back() {
        let (site, counters) = site(64, 2);
        let c = site.connection(32 << 20);
        let mut held: Vec<Held> = Vec::new();
        for _ in 0..4 {
            held.push(now(pin!(c.take(8 * MIB))).await.expect("under the bound"));
        }
        let mut over = pin!(c.take(4 * MIB));
        assert!(now(over.as_mut()).await.is_none(), "the bound is reached");
        assert_eq!(counters.exhausted_connection.load(Ordering::Relaxed), 1);
        assert_eq!(counters.exhausted_site.load(Ordering::Relaxed), 0, "the site had room");
        // The payload is applied: the reply still owed keeps 4 KiB.
        held[0].shrink_to(4096);
        assert_eq!(counters.held_bytes.load(Ordering::Relaxed), (24 << 20) + 4096);
        held.push(now(over.as_mut()).await.expect("the payload's bytes are back under the bound"));
        drop(held);
        assert_eq!(counters.held_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(counters.peak_bytes.load(Ordering::Relaxed), 32 << 20);
    }
}
