//! The relay's side of a data-connection handshake fed arbitrary bytes by a dialler:
//! it must answer with an error or success, never panic, never wait past EOF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use warren_bus::auth::DeviceKey;
use warren_bus::handshake::{accept_agent, Expected};
use warren_bus::{DeviceId, TunnelId};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut relay, mut agent) = tokio::io::duplex(256 * 1024);
        agent.write_all(data).await.expect("duplex has room");
        agent.shutdown().await.expect("shutdown");
        let tunnel: TunnelId = "t1".parse().unwrap();
        let device: DeviceId = "gw1".parse().unwrap();
        let key = DeviceKey::from_hex(&"11".repeat(32)).unwrap();
        let expected = Expected {
            tunnel: &tunnel,
            device: &device,
            key: &key,
            nonce: "n",
        };
        let _ = accept_agent(&mut relay, &expected).await;
        drop(agent);
    });
});
