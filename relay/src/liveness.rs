//! The device table and liveness: what the relay knows about each device, judged from
//! its status (and LWT), heartbeats and telemetry. Pure state; the relay publishes the
//! [`Change`]s it returns.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;
use warren_bus::message::{
    Alert, AlertKind, DeviceInfo, DeviceStatus, Health, Heartbeat, Liveness, Presence,
    TargetHealth, TargetView,
};
use warren_bus::{DeviceId, TargetName, Timestamp};

/// Something to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// New retained health.
    Health(DeviceId, Health),
    /// An alert.
    Alert(Alert),
    /// The device went offline: its tunnels must end.
    Offline(DeviceId),
}

#[derive(Debug, Default)]
struct Device {
    status: Option<DeviceStatus>,
    health: Option<Liveness>,
    last_seen: Option<(Instant, Timestamp)>,
    last_heartbeat: Option<Timestamp>,
    last_telemetry: Option<Timestamp>,
    targets: BTreeMap<TargetName, TargetHealth>,
}

/// Every device the relay has heard of.
pub struct Devices {
    devices: HashMap<DeviceId, Device>,
    heartbeat: Duration,
    late_after: u32,
    lost_after: u32,
}

impl Devices {
    /// An empty table.
    pub fn new(heartbeat: Duration, late_after: u32, lost_after: u32) -> Self {
        Devices {
            devices: HashMap::new(),
            heartbeat,
            late_after,
            lost_after,
        }
    }

    /// Whether the device's agent is online.
    pub fn is_online(&self, d: &DeviceId) -> bool {
        self.devices
            .get(d)
            .and_then(|x| x.status.as_ref())
            .is_some_and(|s| s.state == Presence::Online)
    }

    /// The targets the device announced.
    pub fn targets(&self, d: &DeviceId) -> Vec<TargetName> {
        self.devices
            .get(d)
            .and_then(|x| x.status.as_ref())
            .map(|s| s.targets.iter().map(|t| t.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Forgets a device (removed from the registry).
    pub fn forget(&mut self, d: &DeviceId) {
        self.devices.remove(d);
    }

    fn seen(dev: &mut Device) {
        dev.last_seen = Some((Instant::now(), Timestamp::now()));
    }

    fn set_health(d: &DeviceId, dev: &mut Device, state: Liveness, out: &mut Vec<Change>) {
        let before = dev.health.replace(state);
        if before == Some(state) {
            return;
        }
        out.push(Change::Health(d.clone(), Self::health_of(dev)));
        let kind = match (before, state) {
            (Some(Liveness::Alive | Liveness::Late), Liveness::Lost) => AlertKind::DeviceLost,
            (Some(Liveness::Lost), Liveness::Alive) => AlertKind::DeviceBack,
            _ => return,
        };
        let detail = match kind {
            AlertKind::DeviceLost => format!("device {d} stopped answering"),
            _ => format!("device {d} is back"),
        };
        out.push(Change::Alert(Alert {
            device: d.clone(),
            kind,
            at: Timestamp::now(),
            detail,
        }));
    }

    fn health_of(dev: &Device) -> Health {
        Health {
            state: dev.health.unwrap_or(Liveness::Unknown),
            last_seen: dev.last_seen.map(|(_, t)| t),
            targets: dev.targets.clone(),
        }
    }

    /// A (retained) status message, or the LWT.
    pub fn on_status(&mut self, d: &DeviceId, status: DeviceStatus) -> Vec<Change> {
        let mut out = Vec::new();
        let dev = self.devices.entry(d.clone()).or_default();
        let online = status.state == Presence::Online;
        let was_online = dev
            .status
            .as_ref()
            .is_some_and(|s| s.state == Presence::Online);
        if !online {
            // Keep the targets we knew; the LWT does not list them.
            let targets = dev
                .status
                .as_ref()
                .map(|s| s.targets.clone())
                .unwrap_or_default();
            dev.status = Some(DeviceStatus { targets, ..status });
            if was_online || dev.health.is_some() {
                Self::set_health(d, dev, Liveness::Lost, &mut out);
            }
            out.push(Change::Offline(d.clone()));
        } else {
            dev.status = Some(status);
            Self::seen(dev);
            Self::set_health(d, dev, Liveness::Alive, &mut out);
        }
        out
    }

    /// A heartbeat.
    pub fn on_heartbeat(&mut self, d: &DeviceId, hb: Heartbeat) -> Vec<Change> {
        let mut out = Vec::new();
        let dev = self.devices.entry(d.clone()).or_default();
        Self::seen(dev);
        dev.last_heartbeat = Some(Timestamp::now());
        let mut targets_changed = false;
        for (name, now) in hb.targets {
            let before = dev.targets.insert(name.clone(), now);
            if before == Some(now) {
                continue;
            }
            targets_changed = true;
            let kind = match (before, now) {
                (_, TargetHealth::Down) => AlertKind::TargetDown,
                (Some(TargetHealth::Down), TargetHealth::Up) => AlertKind::TargetUp,
                _ => continue,
            };
            out.push(Change::Alert(Alert {
                device: d.clone(),
                kind,
                at: Timestamp::now(),
                detail: format!("target {name} on {d} is {}", warren_bus::encode_enum(&now)),
            }));
        }
        let before = out.len();
        Self::set_health(d, dev, Liveness::Alive, &mut out);
        if targets_changed && out.len() == before {
            out.push(Change::Health(d.clone(), Self::health_of(dev)));
        }
        out
    }

    /// A telemetry message.
    pub fn on_telemetry(&mut self, d: &DeviceId) {
        let dev = self.devices.entry(d.clone()).or_default();
        Self::seen(dev);
        dev.last_telemetry = Some(Timestamp::now());
    }

    /// Judges every online device by how long it has been silent.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let mut out = Vec::new();
        for (d, dev) in self.devices.iter_mut() {
            let Some((seen, _)) = dev.last_seen else {
                continue;
            };
            if dev.health == Some(Liveness::Lost) {
                continue;
            }
            let silent = now.saturating_duration_since(seen);
            let state = if silent > self.heartbeat * self.lost_after {
                Liveness::Lost
            } else if silent > self.heartbeat * self.late_after {
                Liveness::Late
            } else {
                continue;
            };
            Self::set_health(d, dev, state, &mut out);
        }
        out
    }

    /// The device table for queries, sorted by id.
    pub fn infos(&self, known: &[DeviceId]) -> Vec<DeviceInfo> {
        let mut ids: Vec<&DeviceId> = known.iter().collect();
        ids.sort();
        ids.into_iter()
            .map(|d| {
                let dev = self.devices.get(d);
                let status = dev.and_then(|x| x.status.as_ref());
                DeviceInfo {
                    device: d.clone(),
                    online: status.is_some_and(|s| s.state == Presence::Online),
                    health: dev.and_then(|x| x.health).unwrap_or(Liveness::Unknown),
                    last_seen: dev.and_then(|x| x.last_seen.map(|(_, t)| t)),
                    last_heartbeat: dev.and_then(|x| x.last_heartbeat),
                    last_telemetry: dev.and_then(|x| x.last_telemetry),
                    agent: status.map(|s| s.agent.clone()).unwrap_or_default(),
                    targets: status
                        .map(|s| {
                            s.targets
                                .iter()
                                .map(|t| TargetView {
                                    name: t.name.clone(),
                                    addr: t.addr.clone(),
                                    health: dev.and_then(|x| x.targets.get(&t.name).copied()),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online() -> DeviceStatus {
        DeviceStatus {
            state: Presence::Online,
            agent: "warren-agent/test".into(),
            since: Some(Timestamp::now()),
            targets: vec![],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_makes_a_device_late_then_lost_then_a_heartbeat_brings_it_back() {
        let d: DeviceId = "gw1".parse().unwrap();
        let mut devs = Devices::new(Duration::from_secs(10), 2, 3);
        devs.on_status(&d, online());
        tokio::time::advance(Duration::from_secs(21)).await;
        let ch = devs.tick(Instant::now());
        assert!(
            matches!(&ch[..], [Change::Health(_, h)] if h.state == Liveness::Late),
            "{ch:?}"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let ch = devs.tick(Instant::now());
        assert!(
            ch.iter()
                .any(|c| matches!(c, Change::Alert(a) if a.kind == AlertKind::DeviceLost)),
            "{ch:?}"
        );
        assert!(
            devs.tick(Instant::now()).is_empty(),
            "lost is reported once"
        );
        let hb = Heartbeat {
            seq: 1,
            uptime_s: 31,
            ts: Timestamp::now(),
            targets: BTreeMap::new(),
        };
        let ch = devs.on_heartbeat(&d, hb);
        assert!(
            ch.iter()
                .any(|c| matches!(c, Change::Alert(a) if a.kind == AlertKind::DeviceBack)),
            "{ch:?}"
        );
    }

    #[test]
    fn the_last_will_makes_a_device_lost_at_once_and_ends_its_tunnels() {
        let d: DeviceId = "gw1".parse().unwrap();
        let mut devs = Devices::new(Duration::from_secs(10), 2, 3);
        devs.on_status(&d, online());
        let lwt = DeviceStatus {
            state: Presence::Offline,
            agent: String::new(),
            since: None,
            targets: vec![],
        };
        let ch = devs.on_status(&d, lwt);
        assert!(ch
            .iter()
            .any(|c| matches!(c, Change::Alert(a) if a.kind == AlertKind::DeviceLost)));
        assert!(ch.contains(&Change::Offline(d.clone())));
        assert!(!devs.is_online(&d));
    }
}
