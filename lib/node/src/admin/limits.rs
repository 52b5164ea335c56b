//! Every bound of the admin API, and who gets a connection slot.
//!
//! Owns: the timeouts and sizes that bound what one caller can hold (each constant says why
//! its value), and `Slots`, the admission of a connection once its TLS handshake has told
//! whether it presented an admin certificate: a reserve of slots for admin certificates,
//! a general pool for everyone else (tokens, Prometheus, anonymous callers who are refused
//! at their first request), and a cap per source address on the general pool.
//!
//! Must not: do I/O or read the clock. It counts; `server` acts on the answer, so that the
//! admission rules are tested here without sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// TLS handshakes under way at once; more connections wait in the kernel's backlog. Before
/// its handshake ends nothing is known of a caller, so this pool is shared by everyone: a
/// handshake takes milliseconds of CPU, and 32 at once keep two cores answering while a
/// burst of connections (a switchover's, a dozen scripts') goes through.
pub const MAX_HANDSHAKES: usize = 32;

/// How long a TLS handshake may take before the connection is dropped: TLS 1.3 needs one and
/// a half round trips, so 10 s covers a lossy intercontinental path many times over, while a
/// caller who stalls its handshake holds a handshake slot no longer than this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections past their handshake without an admin certificate (bearer tokens, the metrics
/// token, and anonymous callers until their first answer). An operator's CLI opens one per
/// call, Prometheus one per scrape: 64 is far more than a site's callers need at once, and
/// few enough that a site's memory and descriptors never notice them.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections one source address may hold in the general pool: a quarter of it, so that
/// filling the pool takes at least four addresses, while Prometheus, scripts and a few
/// operators behind one NAT still fit. IPv6 sources count per /64, the block one host is
/// usually given.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 16;

/// Slots kept for connections that presented an admin certificate (known once the TLS
/// handshake ends, before any HTTP byte): however the general pool is held, an operator with
/// a certificate gets in. A switchover holds one per site and `geomirror status` loops hold
/// one each; 16 leaves room for several operators. An admin connection finding the reserve
/// full takes a general slot like anyone else.
pub const ADMIN_RESERVED_CONNECTIONS: usize = 16;

/// How long a connection may take to send a whole request head, from the handshake's end or
/// from its previous answer (so an idle keep-alive connection is closed after it too). A
/// client sends its head in one write; 10 s covers retransmissions on a bad path, and a
/// caller trickling its head a byte at a time holds its slot no longer than this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request body may take to arrive, once its caller is authenticated. The
/// largest body is `MAX_BODY_BYTES`: 10 s is 100 KiB/s, slower than any path a site runs on.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (request line and headers). A real one is a few hundred bytes (the
/// longest header is `Authorization` with a token); past this hyper answers 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Largest request body, read only after the caller is authenticated. The largest real body
/// is a checksum request of `MAX_CHECKSUM_EXTENTS` extents, at most 21 bytes each (twenty
/// digits and a comma): 86 KiB. 1 MiB leaves room for long reasons.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Most extents one checksum request may name. The CLI asks this many at a time; each extent
/// is read whole (up to 64 MiB), so one request reads at most 4096 extents.
pub const MAX_CHECKSUM_EXTENTS: usize = 4096;

/// After an answer that ends a connection (a refusal, or `Connection: close`), how long the
/// server keeps reading and discarding what the client still sends before it closes. Closing
/// a socket with unread bytes makes the kernel send a reset, which can destroy the answer
/// before the client reads it; 2 s is many round trips, and the connection keeps its slot
/// meanwhile, so a client cannot stretch it.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The pool a served connection holds its slot in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    General,
    Admin,
}

impl Pool {
    pub const ALL: [Pool; 2] = [Pool::General, Pool::Admin];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::General => "general",
            Pool::Admin => "admin",
        }
    }
}

/// Why a connection was refused after its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source address holds `MAX_CONNECTIONS_PER_ADDRESS` general slots.
    AddressLimit,
    /// The general pool is full.
    ConnectionLimit,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::AddressLimit, Refusal::ConnectionLimit];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::AddressLimit => "address_limit",
            Refusal::ConnectionLimit => "connection_limit",
        }
    }

    /// What the refused caller reads, in a 503 answer.
    pub fn message(self, source: IpAddr, limits: &Limits) -> String {
        match self {
            Refusal::AddressLimit => format!(
                "too many admin connections from {source}: at most {} at once from one address (slow or idle ones are closed after {} s); \
                 retry, or use an admin certificate, which has slots of its own",
                limits.per_address,
                HEADER_READ_TIMEOUT.as_secs()
            ),
            Refusal::ConnectionLimit => format!(
                "all {} admin connections are in use (slow or idle ones are closed after {} s); retry, or use an admin certificate, \
                 which has slots of its own",
                limits.general,
                HEADER_READ_TIMEOUT.as_secs()
            ),
        }
    }
}

/// A deadline that ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    Handshake,
    Header,
    Body,
}

impl Timeout {
    pub const ALL: [Timeout; 3] = [Timeout::Handshake, Timeout::Header, Timeout::Body];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::Handshake => "handshake",
            Timeout::Header => "header",
            Timeout::Body => "body",
        }
    }
}

/// The sizes of the pools.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub general: usize,
    pub per_address: usize,
    pub admin_reserved: usize,
}

/// The limits a site runs with.
pub const LIMITS: Limits =
    Limits { general: MAX_CONNECTIONS, per_address: MAX_CONNECTIONS_PER_ADDRESS, admin_reserved: ADMIN_RESERVED_CONNECTIONS };

/// The slots in use. `on_change` hears each pool's new count (the metrics).
pub struct Slots {
    limits: Limits,
    state: Mutex<InUse>,
    on_change: Box<dyn Fn(Pool, usize) + Send + Sync>,
}

#[derive(Default)]
struct InUse {
    general: usize,
    admin: usize,
    /// General slots by source (see `source_key`); a source at zero is removed, so this holds
    /// at most `limits.general` entries.
    by_source: HashMap<IpAddr, usize>,
}

/// A slot held by one connection, given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    pool: Pool,
    source: IpAddr,
}

impl Slot {
    pub fn pool(&self) -> Pool {
        self.pool
    }
}

/// The key a source address is counted under: an IPv4 address (also when it arrives mapped
/// into IPv6) as is, an IPv6 address by its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

impl Slots {
    pub fn new(limits: Limits, on_change: impl Fn(Pool, usize) + Send + Sync + 'static) -> Arc<Slots> {
        let slots = Arc::new(Slots { limits, state: Mutex::new(InUse::default()), on_change: Box::new(on_change) });
        for pool in Pool::ALL {
            (slots.on_change)(pool, 0);
        }
        slots
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits a connection from `source` whose handshake ended, with or without an admin
    /// certificate: an admin certificate takes a reserved slot while one is free; everyone
    /// else (and an admin finding the reserve full) takes a general slot, within its source's
    /// share.
    pub fn admit(self: &Arc<Slots>, source: IpAddr, admin_certificate: bool) -> Result<Slot, Refusal> {
        let key = source_key(source);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if admin_certificate && s.admin < self.limits.admin_reserved {
            s.admin += 1;
            (self.on_change)(Pool::Admin, s.admin);
            return Ok(Slot { slots: self.clone(), pool: Pool::Admin, source: key });
        }
        let from_source = s.by_source.get(&key).copied().unwrap_or(0);
        if from_source >= self.limits.per_address {
            return Err(Refusal::AddressLimit);
        }
        if s.general >= self.limits.general {
            return Err(Refusal::ConnectionLimit);
        }
        s.general += 1;
        s.by_source.insert(key, from_source + 1);
        debug_assert!(s.by_source.values().sum::<usize>() == s.general);
        (self.on_change)(Pool::General, s.general);
        Ok(Slot { slots: self.clone(), pool: Pool::General, source: key })
    }

    /// Slots in use: (general, admin).
    pub fn in_use(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.general, s.admin)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        match self.pool {
            Pool::Admin => {
                s.admin -= 1;
                (self.slots.on_change)(Pool::Admin, s.admin);
            }
            Pool::General => {
                s.general -= 1;
                match s.by_source.get_mut(&self.source) {
                    Some(n) if *n > 1 => *n -= 1,
                    _ => {
                        s.by_source.remove(&self.source);
                    }
                }
                (self.slots.on_change)(Pool::General, s.general);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const SMALL: Limits = Limits { general: 4, per_address: 2, admin_reserved: 1 };

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn one_address_gets_its_share_of_the_general_pool_and_no_more() {
        let slots = Slots::new(SMALL, |_, _| {});
        let held: Vec<Slot> = (0..2).map(|_| slots.admit(v4(1), false).unwrap()).collect();
        assert_eq!(slots.admit(v4(1), false).err(), Some(Refusal::AddressLimit));
        // Another address is not affected.
        let other = slots.admit(v4(2), false).unwrap();
        assert_eq!(slots.in_use(), (3, 0));
        drop(held);
        assert!(slots.admit(v4(1), false).is_ok(), "a slot given back is free again");
        drop(other);
    }

    #[test]
    fn a_full_general_pool_refuses_everyone_but_admin_certificates() {
        let slots = Slots::new(SMALL, |_, _| {});
        let _held: Vec<Slot> = (1..=4).map(|i| slots.admit(v4(i / 2 + 1), false).unwrap()).collect();
        assert_eq!(slots.admit(v4(9), false).err(), Some(Refusal::ConnectionLimit));
        let admin = slots.admit(v4(9), true).expect("the reserve lets an admin certificate in");
        assert_eq!(admin.pool(), Pool::Admin);
        // The reserve is full too: the next admin is refused like anyone.
        assert_eq!(slots.admit(v4(9), true).err(), Some(Refusal::ConnectionLimit));
        assert_eq!(slots.in_use(), (4, 1));
    }

    #[test]
    fn an_admin_beyond_the_reserve_takes_a_general_slot_within_its_address_share() {
        let slots = Slots::new(SMALL, |_, _| {});
        let first = slots.admit(v4(1), true).unwrap();
        let second = slots.admit(v4(1), true).unwrap();
        let third = slots.admit(v4(1), true).unwrap();
        assert_eq!((first.pool(), second.pool(), third.pool()), (Pool::Admin, Pool::General, Pool::General));
        assert_eq!(slots.admit(v4(1), true).err(), Some(Refusal::AddressLimit));
        drop(first);
        assert_eq!(slots.admit(v4(1), true).unwrap().pool(), Pool::Admin, "the freed reserved slot is used first");
    }

    #[test]
    fn the_counts_reported_follow_every_admission_and_release() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let slots = Slots::new(SMALL, move |pool, n| log.lock().unwrap().push((pool, n)));
        let a = slots.admit(v4(1), false).unwrap();
        let b = slots.admit(v4(1), true).unwrap();
        assert!(slots.admit(v4(1), false).is_ok());
        drop((a, b));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                (Pool::General, 0),
                (Pool::Admin, 0),
                (Pool::General, 1),
                (Pool::Admin, 1),
                (Pool::General, 2),
                (Pool::General, 1),
                (Pool::General, 0),
                (Pool::Admin, 0)
            ]
        );
        assert_eq!(slots.in_use(), (0, 0));
        assert!(slots.state.lock().unwrap().by_source.is_empty(), "a source at zero is forgotten");
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(source_key(mapped), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        let slots = Slots::new(SMALL, |_, _| {});
        let _held = (slots.admit(a, false).unwrap(), slots.admit(b, false).unwrap());
        assert_eq!(slots.admit("2001:db8:1:2::99".parse().unwrap(), false).err(), Some(Refusal::AddressLimit));
        assert!(slots.admit(IpAddr::V6(Ipv6Addr::LOCALHOST), false).is_ok());
    }
}
