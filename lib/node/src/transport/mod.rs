//! The replication link: QUIC (quinn) with mutual TLS between the two sites.
//!
//! Owns: QUIC endpoints, their transport settings (windows sized from the link's bandwidth
//! and RTT, keep-alive, idle timeout, initial RTT), and TLS (`tls`).
//!
//! Must not: interpret frames. The site driver moves `geomirror_core::Frame`s between the
//! core and the streams; this module only provides authenticated connections.

pub mod framing;
pub mod link;
pub mod liveness;
pub mod pace;
pub mod tls;

use quinn::{ClientConfig, Endpoint, IdleTimeout, ServerConfig, TransportConfig, VarInt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tls::{Refusals, SiteTls, TlsError};

/// What the link is expected to carry, from which QUIC's windows are sized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkTuning {
    /// The link's bandwidth in bytes per second.
    pub bandwidth_bytes_per_sec: u64,
    /// The expected round-trip time: QUIC's first estimate, and the window size's basis.
    pub rtt: Duration,
    /// How often each side probes the other (and QUIC sends its own keep-alive).
    pub keep_alive: Duration,
    /// A peer that answered no probe sent this long ago is declared lost; also QUIC's idle
    /// timeout, which quinn stretches to 3 × PTO on a slow path (a backstop only).
    pub idle_timeout: Duration,
    /// The rate at which bulk data (shipping, resync) is handed to QUIC, below the
    /// bandwidth, so that it never queues ahead of control on the path (see `pace`).
    pub bulk_bytes_per_sec: Option<u64>,
}

impl Default for LinkTuning {
    fn default() -> Self {
        LinkTuning {
            bandwidth_bytes_per_sec: 125_000_000,
            rtt: Duration::from_millis(50),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            bulk_bytes_per_sec: None,
        }
    }
}

impl LinkTuning {
    /// The bandwidth-delay product: what the path holds in flight.
    pub fn bdp_bytes(&self) -> u64 {
        (self.bandwidth_bytes_per_sec as f64 * self.rtt.as_secs_f64()) as u64
    }

    /// Twice the bandwidth-delay product, at least 4 MiB: quinn's defaults assume 100 Mbit/s
    /// at 100 ms and cap one stream near 160 Mbit/s on a 50 ms path.
    pub fn window_bytes(&self) -> u64 {
        (2 * self.bdp_bytes()).clamp(4 << 20, 1 << 30)
    }

    /// How the link checks that its peer is alive: a probe each keep-alive, and the peer
    /// declared lost after an idle timeout without an answer (see `liveness`).
    pub fn liveness(&self) -> liveness::Timing {
        liveness::Timing { keep_alive: self.keep_alive, silence: self.idle_timeout }
    }

    pub fn transport(&self) -> TransportConfig {
        let w = self.window_bytes();
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u64(w).expect("bounded"));
        t.receive_window(VarInt::from_u64(2 * w).expect("bounded"));
        t.send_window(2 * w);
        t.initial_rtt(self.rtt.max(Duration::from_millis(1)));
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(IdleTimeout::try_from(self.idle_timeout).expect("idle timeout within QUIC's range")));
        // CUBIC starts from one bandwidth-delay product rather than ten datagrams. Bulk is
        // paced below the bandwidth by us (`pace`), so this never bursts; with the default,
        // slow start would hold paced data back in quinn's buffer for a few round trips and
        // then release it at the congestion window's rate, overflowing the path's queue.
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(self.bdp_bytes().max(14_720));
        t.congestion_controller_factory(Arc::new(cubic));
        t.max_concurrent_bidi_streams(VarInt::from_u32(4));
        t.max_concurrent_uni_streams(VarInt::from_u32(64));
        t
    }
}

/// The UDP socket buffers a replication or relay socket asks for; the kernel caps them at
/// `net.core.rmem_max` and `wmem_max`. With the kernel's default (about 208 KiB), a
/// 100 Mbit/s stream at 50 ms RTT overflowed the receiving socket whenever its process was
/// briefly descheduled: every packet QUIC counted lost was a kernel `RcvbufErrors`, and
/// CUBIC then held the window under one bandwidth-delay product (docs/benchmarks.md).
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// Asks for `UDP_BUFFER_BYTES` of socket buffer each way, as far as the kernel allows.
pub fn enlarge_udp_buffers(socket: socket2::SockRef<'_>) {
    // Best effort: a smaller buffer still works, as before.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
}

/// A QUIC endpoint on a UDP socket bound to `bind`, with enlarged buffers; it accepts
/// connections when given a server config.
fn quic_endpoint(bind: SocketAddr, server: Option<ServerConfig>) -> Result<Endpoint, TlsError> {
    let open = || -> std::io::Result<Endpoint> {
        let s = socket2::Socket::new(socket2::Domain::for_address(bind), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        enlarge_udp_buffers(socket2::SockRef::from(&s));
        s.bind(&bind.into())?;
        Endpoint::new(quinn::EndpointConfig::default(), server, s.into(), Arc::new(quinn::TokioRuntime))
    };
    open().map_err(|source| TlsError::Bind { addr: bind, source })
}

/// An endpoint that accepts only `expected_peer` and can also connect out.
pub fn endpoint(
    bind: SocketAddr,
    tls: &SiteTls,
    expected_peer: &str,
    tuning: &LinkTuning,
    refusals: Arc<Refusals>,
) -> Result<Endpoint, TlsError> {
    let transport = Arc::new(tuning.transport());
    let server = tls::server_config(tls, expected_peer, refusals.clone())?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut server = ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport.clone());
    let mut ep = quic_endpoint(bind, Some(server))?;
    ep.set_default_client_config(client(tls, transport, refusals)?);
    Ok(ep)
}

/// An endpoint that only connects out.
pub fn client_endpoint(bind: SocketAddr, tls: &SiteTls, tuning: &LinkTuning, refusals: Arc<Refusals>) -> Result<Endpoint, TlsError> {
    let mut ep = quic_endpoint(bind, None)?;
    ep.set_default_client_config(client(tls, Arc::new(tuning.transport()), refusals)?);
    Ok(ep)
}

fn client(tls: &SiteTls, transport: Arc<TransportConfig>, refusals: Arc<Refusals>) -> Result<ClientConfig, TlsError> {
    let c = tls::client_config(tls, refusals)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(c).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport);
    Ok(cfg)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod link_tests;
