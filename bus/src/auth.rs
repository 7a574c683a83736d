//! Device keys and the MACs made with them. The key never crosses the bus: offers,
//! revokes and agent events carry `HMAC-SHA256(key, canonical form)`, the agent's MQTT
//! password is derived from it, and data connections prove it per connection.
//!
//! ```
//! use warren_bus::auth::DeviceKey;
//! let key = DeviceKey::generate();
//! let mac = key.sign(&["offer", "t1", "nonce"]);
//! assert!(key.verify(&["offer", "t1", "nonce"], &mac));
//! assert!(!key.verify(&["offer", "t2", "nonce"], &mac));
//! ```

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::id::{DeviceId, TunnelId};
use crate::message::{AgentEvent, CloseRequest, ExtendRequest, Offer, Revoke, TunnelRequest};
use crate::time::Timestamp;

type HmacSha256 = Hmac<Sha256>;

/// A device's 256-bit secret, shared by the relay's registry and the agent's config.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey([u8; 32]);

/// A key that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("a device key is 64 hex digits")]
pub struct BadKey;

impl DeviceKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        DeviceKey(rand::random())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, BadKey> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut k).map_err(|_| BadKey)?;
        Ok(DeviceKey(k))
    }

    /// The key as 64 hex digits, for the registry and the agent's config only.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn mac(&self, parts: &[&str]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC can take a key of any size");
        for p in parts {
            // Length-prefix each part so ("ab","c") and ("a","bc") differ.
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p.as_bytes());
        }
        m
    }

    /// `HMAC-SHA256` over `parts`, in hex.
    pub fn sign(&self, parts: &[&str]) -> String {
        hex::encode(self.mac(parts).finalize().into_bytes())
    }

    /// Checks a hex MAC over `parts` in constant time.
    pub fn verify(&self, parts: &[&str], mac_hex: &str) -> bool {
        match hex::decode(mac_hex) {
            Ok(bytes) => self.mac(parts).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    /// The password the device's agent logs in to the bus with.
    pub fn mqtt_password(&self) -> String {
        self.sign(&["warren-mqtt-password"])
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(MASKED)")
    }
}

/// Messages MAC'd with a device key: the canonical form binds every field that matters
/// and the device the message is for, so a MAC for one device is useless on another.
pub trait Signed {
    /// The canonical form, every field that must not be altered.
    fn canonical(&self, device: &DeviceId) -> Vec<String>;
    /// The MAC field.
    fn mac_field(&mut self) -> &mut String;

    /// Fills in the MAC.
    fn sign_with(mut self, key: &DeviceKey, device: &DeviceId) -> Self
    where
        Self: Sized,
    {
        let parts = self.canonical(device);
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        *self.mac_field() = key.sign(&refs);
        self
    }

    /// Whether the MAC is right.
    fn verify_with(&mut self, key: &DeviceKey, device: &DeviceId) -> bool {
        let parts = self.canonical(device);
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let mac = self.mac_field().clone();
        key.verify(&refs, &mac)
    }
}

impl Signed for Offer {
    fn canonical(&self, device: &DeviceId) -> Vec<String> {
        vec![
            "offer".into(),
            device.to_string(),
            self.tunnel.to_string(),
            self.relay_host.clone(),
            self.agent_port.to_string(),
            self.target.to_string(),
            self.expires_at.to_string(),
            self.ttl_ms.to_string(),
            self.tls.to_string(),
            self.nonce.clone(),
        ]
    }
    fn mac_field(&mut self) -> &mut String {
        &mut self.mac
    }
}

impl Signed for Revoke {
    fn canonical(&self, device: &DeviceId) -> Vec<String> {
        vec![
            "revoke".into(),
            device.to_string(),
            self.tunnel.to_string(),
            crate::encode_enum(&self.reason),
            self.nonce.clone(),
        ]
    }
    fn mac_field(&mut self) -> &mut String {
        &mut self.mac
    }
}

impl Signed for AgentEvent {
    fn canonical(&self, device: &DeviceId) -> Vec<String> {
        vec![
            "event".into(),
            device.to_string(),
            self.tunnel.to_string(),
            crate::encode_enum(&self.event),
            self.reason.clone().unwrap_or_default(),
        ]
    }
    fn mac_field(&mut self) -> &mut String {
        &mut self.mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::AgentEventKind;

    #[test]
    fn a_mac_binds_the_device_and_every_field() {
        let key = DeviceKey::generate();
        let gw1 = DeviceId::new("gw1").unwrap();
        let gw2 = DeviceId::new("gw2").unwrap();
        let ev = AgentEvent {
            tunnel: "t1".parse().unwrap(),
            event: AgentEventKind::Closed,
            reason: None,
            mac: String::new(),
        }
        .sign_with(&key, &gw1);
        assert!(ev.clone().verify_with(&key, &gw1));
        assert!(!ev.clone().verify_with(&key, &gw2));
        assert!(!ev.clone().verify_with(&DeviceKey::generate(), &gw1));
        let mut forged = ev.clone();
        forged.event = AgentEventKind::Ready;
        assert!(!forged.verify_with(&key, &gw1));
        let mut garbage = ev;
        garbage.mac = "zz".into();
        assert!(!garbage.verify_with(&key, &gw1));
    }

    #[test]
    fn keys_round_trip_as_hex_and_hide_in_debug() {
        let key = DeviceKey::generate();
        assert_eq!(DeviceKey::from_hex(&key.to_hex()).unwrap(), key);
        assert!(DeviceKey::from_hex("abc").is_err());
        assert_eq!(format!("{key:?}"), "DeviceKey(MASKED)");
        assert_ne!(key.mqtt_password(), DeviceKey::generate().mqtt_password());
    }
}

/// Operator requests under `requests.auth = "signed"`: the operator's bus password (64
/// hex digits, from `warren-relay user add`) is the signing key; the relay derives the
/// same key from its registry. Each canonical form names its kind, so a MAC over one
/// kind of request is never valid for another.
pub mod operator {
    use super::*;

    /// How far a signed request's `ts` may be from the relay's clock.
    pub const MAX_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

    /// The signing key behind an operator password.
    pub fn key(password: &str) -> Option<DeviceKey> {
        DeviceKey::from_hex(password).ok()
    }

    fn or_empty<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map(ToString::to_string).unwrap_or_default()
    }

    /// The signed fields of a tunnel request.
    pub fn request_parts(r: &TunnelRequest) -> Vec<String> {
        vec![
            "request".into(),
            or_empty(&r.id),
            r.device.to_string(),
            or_empty(&r.target),
            r.duration
                .map(|d| d.get().as_millis().to_string())
                .unwrap_or_default(),
            r.allow_from
                .as_ref()
                .map(|a| a.join(","))
                .unwrap_or_default(),
            or_empty(&r.user),
            or_empty(&r.ts),
        ]
    }

    /// The signed fields of a close request.
    pub fn close_parts(id: &TunnelId, c: &CloseRequest) -> Vec<String> {
        vec![
            "close".into(),
            id.to_string(),
            or_empty(&c.user),
            or_empty(&c.ts),
        ]
    }

    /// The signed fields of an extend request.
    pub fn extend_parts(id: &TunnelId, e: &ExtendRequest) -> Vec<String> {
        vec![
            "extend".into(),
            id.to_string(),
            e.by.get().as_millis().to_string(),
            or_empty(&e.user),
            or_empty(&e.ts),
        ]
    }

    /// MAC over `parts` (as the functions above make them).
    pub fn sign(key: &DeviceKey, parts: &[String]) -> String {
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        key.sign(&refs)
    }

    /// Checks a MAC and the freshness of `ts`.
    pub fn verify(
        key: &DeviceKey,
        parts: &[String],
        ts: Option<&Timestamp>,
        mac: Option<&str>,
    ) -> bool {
        let (Some(ts), Some(mac)) = (ts, mac) else {
            return false;
        };
        let now = Timestamp::now().unix_ms();
        let skew = now.abs_diff(ts.unix_ms());
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        skew <= MAX_SKEW.as_millis() as u64 && key.verify(&refs, mac)
    }
}
