//! The MQTT front door's CONNECT reader (the first bytes any stranger sends to the
//! broker port), fed arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_bus::connect::read_connect;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut input = data;
        if let Ok(c) = read_connect(&mut input).await {
            let _ = c.rewrite("user", "secret");
            let _ = c.refusal(true);
        }
    });
});
