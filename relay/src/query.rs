//! Answers to `{prefix}/query/{devices,tunnels,targets}`, in pages on the caller's
//! `reply_to`: the relay's tables are the source of truth, since a wildcard subscriber
//! only ever receives 100–200 retained messages from rumqttd.

use serde::Serialize;
use tracing::warn;
use warren_bus::message::{Query, QueryReply};
use warren_bus::{decode, QueryKind};

use crate::relay::Relay;

/// Items per reply page.
pub const PAGE_SIZE: usize = 50;
/// Longest `reply_to` accepted.
const MAX_REPLY_TOPIC: usize = 256;

impl Relay {
    /// Whether replies may go to `topic`: only under `{prefix}/replies/`, never onto a
    /// topic that commands something or belongs to another application on the broker.
    fn reply_topic_ok(&self, topic: &str) -> bool {
        let prefix = self.topics.prefix();
        topic.len() <= MAX_REPLY_TOPIC
            && !topic.contains(['+', '#', '\0'])
            && topic
                .strip_prefix(&format!("{prefix}/replies/"))
                .is_some_and(|rest| !rest.is_empty())
    }

    pub(crate) async fn on_query(&mut self, topic: &str, kind: QueryKind, payload: &[u8]) {
        let q: Query = match decode(topic, payload) {
            Ok(q) => q,
            Err(e) => return warn!(error = %e, "bad query ignored"),
        };
        if !self.reply_topic_ok(&q.reply_to) {
            return warn!(reply_to = %crate::requests::trunc(&q.reply_to), "query with a reply_to we will not publish to ignored");
        }
        match kind {
            QueryKind::Devices => {
                let known = match &q.device {
                    Some(d) => vec![d.clone()],
                    None => self.registry.devices(),
                };
                let items = self.devices.infos(&known);
                self.reply(&q, items).await;
            }
            QueryKind::Tunnels => {
                let mut items: Vec<_> = self
                    .tunnels
                    .values()
                    .filter(|e| q.device.is_none() || e.state.device == q.device)
                    .map(|e| e.state.clone())
                    .collect();
                items.sort_by(|a, b| a.id.cmp(&b.id));
                self.reply(&q, items).await;
            }
            QueryKind::Targets => {
                let Some(d) = &q.device else {
                    let reply: QueryReply<()> = QueryReply {
                        page: 0,
                        pages: 0,
                        total: 0,
                        items: vec![],
                        error: Some("a targets query needs a device".into()),
                    };
                    return self.publish(q.reply_to.clone(), &reply, false).await;
                };
                let items = self
                    .devices
                    .infos(std::slice::from_ref(d))
                    .into_iter()
                    .flat_map(|i| i.targets)
                    .collect();
                self.reply(&q, items).await;
            }
        }
    }

    async fn reply<T: Serialize + Clone>(&self, q: &Query, items: Vec<T>) {
        let total = items.len();
        let pages = total.div_ceil(PAGE_SIZE).max(1);
        let wanted: Vec<usize> = match q.page {
            Some(p) => vec![p],
            None => (0..pages).collect(),
        };
        for page in wanted {
            let slice = items
                .iter()
                .skip(page * PAGE_SIZE)
                .take(PAGE_SIZE)
                .cloned()
                .collect();
            let reply = QueryReply {
                page,
                pages,
                total,
                items: slice,
                error: (page >= pages).then(|| format!("there are only {pages} pages")),
            };
            self.publish(q.reply_to.clone(), &reply, false).await;
        }
    }
}
