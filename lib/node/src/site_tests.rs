//! A whole site started from a config, with a peer that is not there.

use super::*;
use crate::preflight::tests::{config, deployment, on_free_ports};

/// A primary whose peer never answers (its address is a socket that reads nothing) has no
/// link: waiting for the peer to apply its writes cannot help, so it stops at once instead
/// of waiting out `STOP_DRAIN_DEADLINE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_a_link_stops_without_waiting_for_its_peer() {
    let tmp = deployment();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = on_free_ports(config(tmp.path(), "", "media = \"vol0.img\""));
    cfg.peer.as_mut().unwrap().address = silent.local_addr().unwrap();
    let site = RunningSite::start(cfg).await.unwrap();
    assert_eq!(site.role, Role::Primary);
    tokio::time::timeout(STOP_DRAIN_DEADLINE / 3, site.stop()).await.expect("the site stops without waiting for its deadline");
}
