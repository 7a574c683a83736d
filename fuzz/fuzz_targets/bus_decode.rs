//! Every payload type decoded from arbitrary bytes: an error is fine, a panic is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_bus::message::*;
use warren_bus::{codec::peek_tunnel_id, decode};

fuzz_target!(|data: &[u8]| {
    let t = "warren/fuzz";
    let _ = decode::<TunnelRequest>(t, data);
    let _ = decode::<TunnelState>(t, data);
    let _ = decode::<CloseRequest>(t, data);
    let _ = decode::<ExtendRequest>(t, data);
    let _ = decode::<Offer>(t, data);
    let _ = decode::<Revoke>(t, data);
    let _ = decode::<AgentEvent>(t, data);
    let _ = decode::<DeviceStatus>(t, data);
    let _ = decode::<Heartbeat>(t, data);
    let _ = decode::<Telemetry>(t, data);
    let _ = decode::<Health>(t, data);
    let _ = decode::<Alert>(t, data);
    let _ = decode::<Query>(t, data);
    let _ = decode::<QueryReply<DeviceInfo>>(t, data);
    let _ = peek_tunnel_id(data);
});
