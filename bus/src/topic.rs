//! Every topic on the bus, built and parsed here and nowhere else.
//!
//! | topic                                  | from → to          | retained |
//! |----------------------------------------|--------------------|----------|
//! | `{p}/devices/{device}/status`          | agent → all (LWT)  | yes      |
//! | `{p}/devices/{device}/heartbeat`       | agent → relay      | no       |
//! | `{p}/devices/{device}/telemetry`       | agent → all        | no       |
//! | `{p}/devices/{device}/health`          | relay → all        | yes      |
//! | `{p}/alerts/{device}`                  | relay → ops        | no       |
//! | `{p}/tunnels/request`                  | anyone → relay     | no       |
//! | `{p}/tunnels/{id}/state`               | relay → all        | yes      |
//! | `{p}/tunnels/{id}/close`               | anyone → relay     | no       |
//! | `{p}/tunnels/{id}/extend`              | anyone → relay     | no       |
//! | `{p}/agents/{device}/offer`            | relay → agent      | no, QoS1 |
//! | `{p}/agents/{device}/revoke`           | relay → agent      | no, QoS1 |
//! | `{p}/agents/{device}/events`           | agent → relay      | no, QoS1 |
//! | `{p}/relays/{relay}/status`            | relay → all (LWT)  | yes      |
//! | `{p}/query/{devices,tunnels,targets}`  | anyone → relay     | no       |
//! | `{p}/audit`                            | relay → ops        | no       |
//! | `{p}/replies/{login}`                  | relay → one login  | no       |
//!
//! `{p}` is the configured prefix, `warren` by default. Who may publish and subscribe
//! to which of these is [`crate::acl`]'s rule table.

use crate::id::{check_id, DeviceId, IdError, RelayId, TunnelId};

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "warren";

/// What a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// The device table.
    Devices,
    /// The tunnel table.
    Tunnels,
    /// One device's targets.
    Targets,
}

impl QueryKind {
    fn as_str(self) -> &'static str {
        match self {
            QueryKind::Devices => "devices",
            QueryKind::Tunnels => "tunnels",
            QueryKind::Targets => "targets",
        }
    }
}

/// A topic taken apart: which message it carries, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `devices/{device}/status`
    DeviceStatus(DeviceId),
    /// `devices/{device}/heartbeat`
    Heartbeat(DeviceId),
    /// `devices/{device}/telemetry`
    Telemetry(DeviceId),
    /// `devices/{device}/health`
    Health(DeviceId),
    /// `alerts/{device}`
    Alert(DeviceId),
    /// `tunnels/request`
    TunnelRequest,
    /// `tunnels/{id}/state`
    TunnelState(TunnelId),
    /// `tunnels/{id}/close`
    TunnelClose(TunnelId),
    /// `tunnels/{id}/extend`
    TunnelExtend(TunnelId),
    /// `agents/{device}/offer`
    Offer(DeviceId),
    /// `agents/{device}/revoke`
    Revoke(DeviceId),
    /// `agents/{device}/events`
    AgentEvents(DeviceId),
    /// `relays/{relay}/status`
    RelayStatus(RelayId),
    /// `query/{kind}`
    Query(QueryKind),
    /// `audit`
    Audit,
}

/// Builds and parses topics under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Topics {
    /// Topics under `prefix`: one or more `/`-separated levels, each a valid id.
    pub fn new(prefix: &str) -> Result<Self, IdError> {
        for level in prefix.split('/') {
            check_id(level)?;
        }
        Ok(Topics {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn t(&self, rest: std::fmt::Arguments) -> String {
        format!("{}/{}", self.prefix, rest)
    }

    /// Retained online/offline status of a device.
    pub fn device_status(&self, d: &DeviceId) -> String {
        self.t(format_args!("devices/{d}/status"))
    }
    /// A device's heartbeat.
    pub fn heartbeat(&self, d: &DeviceId) -> String {
        self.t(format_args!("devices/{d}/heartbeat"))
    }
    /// A device's telemetry.
    pub fn telemetry(&self, d: &DeviceId) -> String {
        self.t(format_args!("devices/{d}/telemetry"))
    }
    /// Retained health of a device, as the relay sees it.
    pub fn health(&self, d: &DeviceId) -> String {
        self.t(format_args!("devices/{d}/health"))
    }
    /// Alerts about a device.
    pub fn alert(&self, d: &DeviceId) -> String {
        self.t(format_args!("alerts/{d}"))
    }
    /// Where tunnel requests go.
    pub fn tunnel_request(&self) -> String {
        self.t(format_args!("tunnels/request"))
    }
    /// Retained state of one tunnel.
    pub fn tunnel_state(&self, id: &TunnelId) -> String {
        self.t(format_args!("tunnels/{id}/state"))
    }
    /// Asks the relay to close a tunnel.
    pub fn tunnel_close(&self, id: &TunnelId) -> String {
        self.t(format_args!("tunnels/{id}/close"))
    }
    /// Asks the relay to extend a tunnel.
    pub fn tunnel_extend(&self, id: &TunnelId) -> String {
        self.t(format_args!("tunnels/{id}/extend"))
    }
    /// Offers to one agent.
    pub fn offer(&self, d: &DeviceId) -> String {
        self.t(format_args!("agents/{d}/offer"))
    }
    /// Revokes to one agent.
    pub fn revoke(&self, d: &DeviceId) -> String {
        self.t(format_args!("agents/{d}/revoke"))
    }
    /// Events from one agent.
    pub fn agent_events(&self, d: &DeviceId) -> String {
        self.t(format_args!("agents/{d}/events"))
    }
    /// Retained status of one relay.
    pub fn relay_status(&self, r: &RelayId) -> String {
        self.t(format_args!("relays/{r}/status"))
    }
    /// Queries of one kind.
    pub fn query(&self, kind: QueryKind) -> String {
        self.t(format_args!("query/{}", kind.as_str()))
    }
    /// The audit stream.
    pub fn audit(&self) -> String {
        self.t(format_args!("audit"))
    }

    /// Where the clients of `login` receive query replies: one topic per login, never
    /// one per run or per request (rumqttd keeps a commit log for every filter it ever
    /// saw, ~237 KiB each); queries carry a `ref` to tell the answers apart. Under the
    /// login, so the topic rules let only that login read it.
    pub fn reply_base(&self, login: &str) -> String {
        self.t(format_args!("replies/{login}"))
    }

    /// What an operator may watch (all of it is readable under the topic rules): tunnel
    /// states, device topics, alerts, relays.
    pub fn operator_view(&self) -> Vec<String> {
        vec![
            self.all_tunnel_states(),
            self.t(format_args!("devices/#")),
            self.t(format_args!("alerts/#")),
            self.t(format_args!("relays/+/status")),
        ]
    }

    /// Every device topic of every device (`{p}/devices/+/+`).
    pub fn all_device_topics(&self) -> String {
        self.t(format_args!("devices/+/+"))
    }
    /// Every agent event (`{p}/agents/+/events`).
    pub fn all_agent_events(&self) -> String {
        self.t(format_args!("agents/+/events"))
    }
    /// Close requests of every tunnel (`{p}/tunnels/+/close`).
    ///
    /// The relay subscribes to this and [`Topics::all_tunnel_extends`] rather than to
    /// `tunnels/+/+`, which would echo every state it publishes back to it and make
    /// rumqttd keep each state topic in one more filter's log.
    pub fn all_tunnel_closes(&self) -> String {
        self.t(format_args!("tunnels/+/close"))
    }
    /// Extension requests of every tunnel (`{p}/tunnels/+/extend`).
    pub fn all_tunnel_extends(&self) -> String {
        self.t(format_args!("tunnels/+/extend"))
    }
    /// Every tunnel's state (`{p}/tunnels/+/state`): one fixed filter for all tunnels a
    /// client follows.
    pub fn all_tunnel_states(&self) -> String {
        self.t(format_args!("tunnels/+/state"))
    }
    /// Every query (`{p}/query/+`).
    pub fn all_queries(&self) -> String {
        self.t(format_args!("query/+"))
    }
    /// Everything one agent must hear (`{p}/agents/{device}/+`).
    pub fn agent_inbox(&self, d: &DeviceId) -> String {
        self.t(format_args!("agents/{d}/+"))
    }
    /// Everything under the prefix.
    pub fn everything(&self) -> String {
        self.t(format_args!("#"))
    }
    /// Tunnel requests shared among all relays on one broker: each request reaches one relay.
    pub fn shared_tunnel_requests(&self) -> String {
        format!("$share/relays/{}", self.tunnel_request())
    }

    /// Takes a topic apart; `None` for topics outside the contract or with a bad id.
    pub fn parse(&self, topic: &str) -> Option<Route> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let levels: Vec<&str> = rest.split('/').collect();
        let dev = |s: &str| DeviceId::new(s).ok();
        let tun = |s: &str| TunnelId::new(s).ok();
        Some(match levels.as_slice() {
            ["devices", d, "status"] => Route::DeviceStatus(dev(d)?),
            ["devices", d, "heartbeat"] => Route::Heartbeat(dev(d)?),
            ["devices", d, "telemetry"] => Route::Telemetry(dev(d)?),
            ["devices", d, "health"] => Route::Health(dev(d)?),
            ["alerts", d] => Route::Alert(dev(d)?),
            ["tunnels", "request"] => Route::TunnelRequest,
            ["tunnels", id, "state"] => Route::TunnelState(tun(id)?),
            ["tunnels", id, "close"] => Route::TunnelClose(tun(id)?),
            ["tunnels", id, "extend"] => Route::TunnelExtend(tun(id)?),
            ["agents", d, "offer"] => Route::Offer(dev(d)?),
            ["agents", d, "revoke"] => Route::Revoke(dev(d)?),
            ["agents", d, "events"] => Route::AgentEvents(dev(d)?),
            ["relays", r, "status"] => Route::RelayStatus(RelayId::new(*r).ok()?),
            ["query", "devices"] => Route::Query(QueryKind::Devices),
            ["query", "tunnels"] => Route::Query(QueryKind::Tunnels),
            ["query", "targets"] => Route::Query(QueryKind::Targets),
            ["audit"] => Route::Audit,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_topic_parses_back_to_its_route() {
        let t = Topics::default();
        let d = DeviceId::new("gw1").unwrap();
        let id = TunnelId::new("t42").unwrap();
        let r = RelayId::new("r1").unwrap();
        let cases = [
            (t.device_status(&d), Route::DeviceStatus(d.clone())),
            (t.heartbeat(&d), Route::Heartbeat(d.clone())),
            (t.telemetry(&d), Route::Telemetry(d.clone())),
            (t.health(&d), Route::Health(d.clone())),
            (t.alert(&d), Route::Alert(d.clone())),
            (t.tunnel_request(), Route::TunnelRequest),
            (t.tunnel_state(&id), Route::TunnelState(id.clone())),
            (t.tunnel_close(&id), Route::TunnelClose(id.clone())),
            (t.tunnel_extend(&id), Route::TunnelExtend(id.clone())),
            (t.offer(&d), Route::Offer(d.clone())),
            (t.revoke(&d), Route::Revoke(d.clone())),
            (t.agent_events(&d), Route::AgentEvents(d.clone())),
            (t.relay_status(&r), Route::RelayStatus(r.clone())),
            (
                t.query(QueryKind::Devices),
                Route::Query(QueryKind::Devices),
            ),
            (
                t.query(QueryKind::Tunnels),
                Route::Query(QueryKind::Tunnels),
            ),
            (
                t.query(QueryKind::Targets),
                Route::Query(QueryKind::Targets),
            ),
            (t.audit(), Route::Audit),
        ];
        for (topic, route) in cases {
            assert_eq!(t.parse(&topic), Some(route), "{topic}");
        }
        assert_eq!(t.tunnel_state(&id), "warren/tunnels/t42/state");
        assert_eq!(
            t.shared_tunnel_requests(),
            "$share/relays/warren/tunnels/request"
        );
    }

    #[test]
    fn foreign_or_hostile_topics_do_not_parse() {
        let t = Topics::new("acme/warren").unwrap();
        for topic in [
            "warren/tunnels/request",
            "acme/warren/devices/gw1",
            "acme/warren/devices/+/status",
            "acme/warren/devices/$x/status",
            "acme/warren/agents/gw1/offer/extra",
            "acme/warrenx/tunnels/request",
        ] {
            assert_eq!(t.parse(topic), None, "{topic}");
        }
        assert!(Topics::new("a/+").is_err());
        assert!(Topics::new("").is_err());
    }
}
