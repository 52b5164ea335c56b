//! The NBD front end hosts connect to.
//!
//! `proto` and `handshake` are pure byte-level code (fuzzed); `server` is the async shell
//! that accepts connections, bounds them, and hands requests to a volume.

pub mod handshake;
pub mod proto;
pub mod server;

#[cfg(test)]
mod robustness;
