//! The ways a tunnel ends besides close and expiry, and what they leave behind.

use std::time::Duration;

use tokio::net::TcpStream;
use warren_bus::message::{Phase, Reason};
use warren_tests::*;

async fn relay_agent_watcher(
    opts: RelayOpts,
) -> (Relay, Proc, Watcher, tokio_util::sync::DropGuard) {
    let (echo, guard) = echo_server().await;
    let relay = spawn_relay(opts).await;
    let cfg = relay.add_device("gw1", &[("echo", echo)]);
    let mut w = Watcher::connect(&relay).await;
    let agent = spawn_agent(&relay, &cfg);
    w.wait_online("gw1").await;
    (relay, agent, w, guard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_mid_tunnel_ends_it_as_device_offline() {
    let (_relay, mut agent, mut w, _g) = relay_agent_watcher(RelayOpts::default()).await;
    w.request(r#"{"id":"tk","device":"gw1","target":"echo"}"#)
        .await;
    let port = w.wait_state("tk", Phase::Open).await.user_port.unwrap();
    agent.kill();
    let st = w.wait_state("tk", Phase::Closed).await;
    assert!(
        matches!(st.reason, Some(Reason::DeviceOffline | Reason::AgentClosed)),
        "{:?}",
        st.reason
    );
    assert!(refused(port).await);
    w.wait_for("warren/alerts/gw1", |v| v["kind"] == "device_lost")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_mid_tunnel_leaves_the_agent_to_close_at_expiry() {
    let (mut relay, agent, mut w, _g) = relay_agent_watcher(RelayOpts::default()).await;
    w.request(r#"{"id":"tr","device":"gw1","target":"echo","duration":"3s"}"#)
        .await;
    w.wait_state("tr", Phase::Open).await;
    let opened = tokio::time::Instant::now();
    relay.proc.kill();
    wait_for_log(&agent, "tunnel closed on the agent's side end=Expired").await;
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "closed before its time: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_tunnel_with_relay_shutdown_and_exits_cleanly() {
    let (mut relay, agent, mut w, _g) = relay_agent_watcher(RelayOpts::default()).await;
    for id in ["ts1", "ts2"] {
        w.request(&format!(
            r#"{{"id":"{id}","device":"gw1","target":"echo"}}"#
        ))
        .await;
        w.wait_state(id, Phase::Open).await;
    }
    relay.proc.signal(libc::SIGTERM);
    for id in ["ts1", "ts2"] {
        let st = w.wait_state(id, Phase::Closed).await;
        assert_eq!(st.reason, Some(Reason::RelayShutdown));
    }
    let status = relay
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("relay exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    wait_for_log(&agent, "tunnel revoked by the relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_device_closes_its_tunnels_and_refuses_new_ones() {
    let (relay, agent, mut w, _g) = relay_agent_watcher(RelayOpts::default()).await;
    w.request(r#"{"id":"tx","device":"gw1","target":"echo"}"#)
        .await;
    w.wait_state("tx", Phase::Open).await;
    let out = relay.admin(&["device", "remove", "gw1"]);
    assert!(out.status.success());
    let st = w.wait_state("tx", Phase::Closed).await;
    assert_eq!(st.reason, Some(Reason::DeviceRemoved));
    drop(agent);
    // Its key opens nothing any more: requests for it are refused.
    w.request(r#"{"id":"tx2","device":"gw1"}"#).await;
    let st = w.wait_state("tx2", Phase::Rejected).await;
    assert_eq!(st.reason, Some(Reason::UnknownDevice));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_open_close_cycles_leave_fds_and_ports_where_they_started() {
    let (relay, _agent, mut w, _g) = relay_agent_watcher(RelayOpts {
        range: port_range(20),
        ..Default::default()
    })
    .await;
    // Warm up: one full cycle so lazily created state exists before counting.
    cycle(&mut w, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_before = relay.proc.fd_count();
    for i in 1..=500 {
        cycle(&mut w, i).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fds_after = relay.proc.fd_count();
    assert!(
        fds_after <= fds_before + 2,
        "fds grew from {fds_before} to {fds_after}"
    );
    for port in relay.range.0..=relay.range.1 {
        let l = std::net::TcpListener::bind(("127.0.0.1", port));
        assert!(
            l.is_ok(),
            "port {port} is still held after every tunnel closed"
        );
    }
}

async fn cycle(w: &mut Watcher, i: usize) {
    let id = format!("c{i}");
    w.request(&format!(
        r#"{{"id":"{id}","device":"gw1","target":"echo"}}"#
    ))
    .await;
    let port = w.wait_state(&id, Phase::Open).await.user_port.unwrap();
    let c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(round_trip(c, b"x").await, b"x");
    w.publish(&format!("warren/tunnels/{id}/close"), "{}").await;
    w.wait_state(&id, Phase::Closed).await;
}
