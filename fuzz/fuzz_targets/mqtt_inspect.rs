//! The front door's packet inspection (every packet a device or operator sends after
//! CONNECT), fed arbitrary bytes in arbitrary pieces, as MQTT 3.1.1 and 5; and the
//! SUBACK amendment it applies on the way down.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use warren_bus::acl::{Grants, Identity, Rules};
use warren_bus::inspect::{amend_suback, frame, Inspector};
use warren_bus::Topics;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let level = if first & 1 == 0 { 4 } else { 5 };
    let who = match first >> 1 & 3 {
        0 => Identity::device("gw1"),
        1 => Identity::operator("ana", Grants::All),
        _ => Identity::operator("bob", Grants::Only(vec!["plc-*".into()])),
    };
    let rules = Arc::new(Rules::new(&Topics::default()));
    let mut inspector = Inspector::new(rules, who, level, 64 * 1024);
    let mut buf = Vec::new();
    // Feed in pieces whose sizes come from the input itself.
    let mut at = 0;
    while at < rest.len() {
        let n = 1 + rest[at] as usize % 64;
        let end = (at + n).min(rest.len());
        buf.extend_from_slice(&rest[at..end]);
        at = end;
        loop {
            match inspector.client_bytes(&mut buf) {
                Ok(out) if out.suback_plan.is_some() => continue,
                Ok(_) => break,
                Err(_) => return,
            }
        }
    }
    if let Ok(Some((_, hlen, total))) = frame(rest, 64 * 1024) {
        let plan: Vec<Option<u8>> = rest.iter().take(8).map(|b| (b & 1 == 1).then_some(0x80)).collect();
        let _ = amend_suback(&rest[..total], hlen, level, &plan);
    }
});
