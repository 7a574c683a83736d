//! The front door's packet inspection: every packet a client sends is read and judged by
//! the [`crate::acl`] rules before rumqttd sees it, MQTT 3.1.1 and 5 alike.
//!
//! - PUBLISH on a topic the client may not use (or retained where it may not retain) is
//!   dropped. At QoS 1 the client still gets its PUBACK (MQTT 5: reason 0x87 Not
//!   authorized) so it does not resend forever; at QoS 2 a PUBREC (and, in 3.1.1, the
//!   PUBCOMP for its PUBREL), so the exchange ends.
//! - SUBSCRIBE: each refused filter gets a failure in the SUBACK (0x80; MQTT 5: 0x87).
//!   When some filters of one SUBSCRIBE pass, the others are taken out of the packet
//!   rumqttd sees and their failures are put back into rumqttd's SUBACK on the way down.
//! - MQTT 5 topic aliases are resolved here, so an alias cannot smuggle a topic past.
//! - UNSUBSCRIBE, PING, acknowledgements and DISCONNECT pass unread; a second CONNECT,
//!   an unknown alias or a malformed packet ends the connection.
//!
//! [`Inspector`] is pure: bytes in, decisions out; the front door does the I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::acl::{Identity, Refusal, Rules};
use crate::wire::{packet, Malformed, Reader};

/// Refusals a login may collect within [`STRIKE_WINDOW`] before it is cut off.
pub const MAX_STRIKES: usize = 20;
/// The window [`MAX_STRIKES`] counts in.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(60);
/// How long a login that was cut off is refused at CONNECT.
pub const CUT_OFF_FOR: Duration = Duration::from_secs(30);
/// Refusals logged and audited per login in full within a window; after that, one in a
/// hundred.
pub const REFUSALS_IN_FULL: usize = 10;
/// Logins remembered at most (the oldest records go first).
const MAX_REMEMBERED: usize = 4096;

/// Refusals per login, across its sessions: a client that reconnects does not start
/// over. Shared by every connection of one front door.
#[derive(Default)]
pub struct Strikes {
    logins: std::sync::Mutex<HashMap<String, Record>>,
}

#[derive(Default)]
struct Record {
    recent: VecDeque<Instant>,
    total: u64,
    cut_until: Option<Instant>,
}

/// What to do about one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strike {
    /// Log and audit it (the first few in a window, then one in a hundred).
    pub report: bool,
    /// Cut the session off (and refuse the login for [`CUT_OFF_FOR`]).
    pub cut: bool,
}

impl Strikes {
    /// Counts one refusal of `login`.
    pub fn record(&self, login: &str, now: Instant) -> Strike {
        let mut logins = self.logins.lock().expect("strikes lock");
        if logins.len() >= MAX_REMEMBERED && !logins.contains_key(login) {
            logins.retain(|_, r| r.cut_until.is_some_and(|t| t > now));
            if logins.len() >= MAX_REMEMBERED {
                logins.clear();
            }
        }
        let r = logins.entry(login.to_owned()).or_default();
        while r
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > STRIKE_WINDOW)
        {
            r.recent.pop_front();
        }
        r.recent.push_back(now);
        r.total += 1;
        let report = r.recent.len() <= REFUSALS_IN_FULL || r.total.is_multiple_of(100);
        let cut = r.recent.len() > MAX_STRIKES;
        if cut {
            r.cut_until = Some(now + CUT_OFF_FOR);
            r.recent.clear();
        }
        Strike { report, cut }
    }

    /// Whether `login` is cut off now.
    pub fn cut_off(&self, login: &str, now: Instant) -> bool {
        self.logins
            .lock()
            .expect("strikes lock")
            .get(login)
            .and_then(|r| r.cut_until)
            .is_some_and(|t| t > now)
    }
}

/// Why a connection is ended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Violation {
    /// Not MQTT as the client announced it.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Bigger than the broker accepts.
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    /// It kept trying what the rules refuse.
    #[error("over {MAX_STRIKES} refusals within {STRIKE_WINDOW:?}: cut off for {CUT_OFF_FOR:?}")]
    KeptTrying,
}

/// One whole packet at the head of `buf`: `(header byte, header length, total length)`,
/// or `None` while more bytes are needed.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<(u8, usize, usize)>, Violation> {
    let Some(&header) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if len > max {
                return Err(Violation::TooLarge(len));
            }
            let total = 2 + i + len;
            return Ok((buf.len() >= total).then_some((header, 2 + i, total)));
        }
    }
    Err(Violation::Malformed("remaining length"))
}

impl From<Malformed> for Violation {
    fn from(what: Malformed) -> Self {
        Violation::Malformed(what)
    }
}

/// The Topic Alias property in an MQTT 5 PUBLISH's properties, if any, and the
/// properties without it.
fn topic_alias(props: &[u8]) -> Result<(Option<u16>, Vec<u8>), Violation> {
    let mut r = Reader::new(props);
    let mut alias = None;
    let mut others = Vec::with_capacity(props.len());
    while r.at < props.len() {
        let start = r.at;
        let id = r.varint()?;
        match id {
            0x01 => {
                r.u8()?; // payload format indicator
            }
            0x02 => {
                r.take(4)?; // message expiry interval
            }
            0x03 | 0x08 => {
                r.str()?; // content type, response topic
            }
            0x09 => {
                // correlation data
                let n = r.u16()? as usize;
                r.take(n)?;
            }
            0x0b => {
                r.varint()?; // subscription identifier
            }
            0x23 => alias = Some(r.u16()?), // topic alias
            0x26 => {
                r.str()?; // user property: a name and a value
                r.str()?;
            }
            _ => return Err(Violation::Malformed("PUBLISH property")),
        }
        if id != 0x23 {
            others.extend_from_slice(&props[start..r.at]);
        }
    }
    Ok((alias, others))
}

/// MQTT 5 subscription options rumqttd can take: QoS 0–2, retain handling 0–2, the
/// reserved bits clear.
fn valid_options(level: u8, o: u8) -> bool {
    match level {
        5 => o & 0xc0 == 0 && o & 0x03 != 3 && (o >> 4) & 0x03 != 3,
        _ => o & 0xfc == 0 && o != 3,
    }
}

/// What one client packet becomes.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes for rumqttd.
    pub forward: Vec<u8>,
    /// Bytes for the client (acknowledgements of refused packets).
    pub reply: Vec<u8>,
    /// A SUBACK of rumqttd's to amend on its way down: packet id and, per filter the
    /// client sent, `Some(code)` for refused ones.
    pub suback_plan: Option<(u16, Vec<Option<u8>>)>,
    /// What was refused.
    pub refused: Vec<Refusal>,
}

/// One client session's inspection state.
pub struct Inspector {
    rules: Arc<Rules>,
    who: Identity,
    level: u8,
    max_packet: usize,
    aliases: HashMap<u16, String>,
    /// MQTT 3.1.1 QoS 2 publishes we refused and answered PUBREC for: their PUBREL is ours.
    refused_qos2: HashSet<u16>,
}

impl Inspector {
    /// Inspection for `who`, speaking MQTT `level` (4 or 5).
    pub fn new(rules: Arc<Rules>, who: Identity, level: u8, max_packet: usize) -> Self {
        Inspector {
            rules,
            who,
            level,
            max_packet,
            aliases: HashMap::new(),
            refused_qos2: HashSet::new(),
        }
    }

    /// The MQTT level it speaks (4 or 5).
    pub fn level(&self) -> u8 {
        self.level
    }

    /// Whom it inspects.
    pub fn identity(&self) -> &Identity {
        &self.who
    }

    /// Judges the will of a CONNECT: `(topic, retained)`.
    pub fn will(&self, topic: &str, retain: bool) -> Result<(), Refusal> {
        // A will is published for the client; it must be a topic it may retain on if it
        // asks for retain, and publish on in any case.
        self.rules
            .may_publish(&self.who, topic, retain)
            .map_err(|r| Refusal { what: "will", ..r })
    }

    /// Takes every whole packet off the front of `buf` and judges it.
    pub fn client_bytes(&mut self, buf: &mut Vec<u8>) -> Result<Outcome, Violation> {
        let mut out = Outcome::default();
        let mut at = 0;
        while let Some((header, hlen, total)) = frame(&buf[at..], self.max_packet)? {
            let whole = &buf[at..at + total];
            let body = &whole[hlen..];
            self.packet(header, whole, body, &mut out)?;
            at += total;
            if out.suback_plan.is_some() {
                // rumqttd's SUBACK must find its plan: hand this one over before the next.
                break;
            }
        }
        buf.drain(..at);
        Ok(out)
    }

    fn packet(
        &mut self,
        header: u8,
        whole: &[u8],
        body: &[u8],
        out: &mut Outcome,
    ) -> Result<(), Violation> {
        match header >> 4 {
            1 => Err(Violation::Malformed("second CONNECT")),
            3 => self.publish(header, whole, body, out),
            6 => {
                let pkid = Reader::new(body).u16()?;
                if self.refused_qos2.remove(&pkid) {
                    out.reply
                        .extend_from_slice(&[0x70, 0x02, (pkid >> 8) as u8, pkid as u8]);
                } else {
                    out.forward.extend_from_slice(whole);
                }
                Ok(())
            }
            8 => self.subscribe(header, body, out),
            _ => {
                out.forward.extend_from_slice(whole);
                Ok(())
            }
        }
    }

    fn publish(
        &mut self,
        header: u8,
        whole: &[u8],
        body: &[u8],
        out: &mut Outcome,
    ) -> Result<(), Violation> {
        let (qos, retain) = ((header >> 1) & 3, header & 1 == 1);
        let mut r = Reader::new(body);
        let written = r.str()?;
        let pkid = match qos {
            0 => 0,
            1 | 2 => r.u16()?,
            _ => return Err(Violation::Malformed("QoS 3")),
        };
        // MQTT 5 topic aliases are resolved here and never reach rumqttd: it resolves a
        // QoS 2 publish's alias only at PUBREL, by then perhaps pointing elsewhere.
        let (topic, unaliased) = if self.level == 5 {
            let n = r.varint()?;
            match topic_alias(r.take(n)?)? {
                (None, _) => (written.to_owned(), None),
                (Some(alias), others) => {
                    let topic = match written.is_empty() {
                        true => self
                            .aliases
                            .get(&alias)
                            .cloned()
                            .ok_or(Violation::Malformed("unknown topic alias"))?,
                        false => {
                            self.aliases.insert(alias, written.to_owned());
                            written.to_owned()
                        }
                    };
                    (topic, Some(others))
                }
            }
        } else {
            (written.to_owned(), None)
        };
        let Err(refusal) = self.rules.may_publish(&self.who, &topic, retain) else {
            match unaliased {
                None => out.forward.extend_from_slice(whole),
                Some(props) => {
                    let mut b = (topic.len() as u16).to_be_bytes().to_vec();
                    b.extend_from_slice(topic.as_bytes());
                    if qos > 0 {
                        b.extend_from_slice(&pkid.to_be_bytes());
                    }
                    crate::wire::write_varint(&mut b, props.len());
                    b.extend_from_slice(&props);
                    b.extend_from_slice(r.rest());
                    out.forward.extend(packet(header, &b));
                }
            }
            return Ok(());
        };
        out.refused.push(refusal);
        let [hi, lo] = pkid.to_be_bytes();
        let ack = match (qos, self.level) {
            (0, _) => return Ok(()),
            (1, 5) => vec![0x40, 0x03, hi, lo, 0x87],
            (1, _) => vec![0x40, 0x02, hi, lo],
            (_, 5) => vec![0x50, 0x03, hi, lo, 0x87],
            (_, _) => {
                self.refused_qos2.insert(pkid);
                vec![0x50, 0x02, hi, lo]
            }
        };
        out.reply.extend_from_slice(&ack);
        Ok(())
    }

    /// A SUBSCRIBE is always written anew from what was judged, without its MQTT 5
    /// properties: rumqttd 0.20 reads a SUBSCRIBE's property block with a running count
    /// that can end away from its declared length, so copied bytes could make it read
    /// filters (`#`) other than the ones judged here.
    fn subscribe(&mut self, header: u8, body: &[u8], out: &mut Outcome) -> Result<(), Violation> {
        if header != 0x82 {
            return Err(Violation::Malformed("SUBSCRIBE flags"));
        }
        let mut r = Reader::new(body);
        let pkid = r.u16()?;
        if self.level == 5 {
            r.properties()?;
        }
        let failure = if self.level == 5 { 0x87 } else { 0x80 };
        let mut plan = Vec::new();
        let mut kept = Vec::new();
        while !r.rest().is_empty() {
            let filter = r.str()?;
            let options = r.u8()?;
            if !valid_options(self.level, options) {
                return Err(Violation::Malformed("subscription options"));
            }
            match self.rules.may_subscribe(&self.who, filter) {
                Ok(()) => {
                    plan.push(None);
                    kept.extend_from_slice(&(filter.len() as u16).to_be_bytes());
                    kept.extend_from_slice(filter.as_bytes());
                    kept.push(options);
                }
                Err(refusal) => {
                    plan.push(Some(failure));
                    out.refused.push(refusal);
                }
            }
        }
        if plan.is_empty() {
            return Err(Violation::Malformed("SUBSCRIBE without filters"));
        }
        if kept.is_empty() {
            let mut ack = pkid.to_be_bytes().to_vec();
            if self.level == 5 {
                ack.push(0);
            }
            ack.extend(plan.iter().map(|c| c.unwrap_or(failure)));
            out.reply.extend(packet(0x90, &ack));
            return Ok(());
        }
        let mut sub = pkid.to_be_bytes().to_vec();
        if self.level == 5 {
            sub.push(0); // no properties
        }
        sub.extend(kept);
        out.forward.extend(packet(header, &sub));
        if plan.iter().any(Option::is_some) {
            out.suback_plan = Some((pkid, plan));
        }
        Ok(())
    }
}

/// Puts refused filters' failures back into rumqttd's SUBACK (`whole`), following `plan`.
pub fn amend_suback(
    whole: &[u8],
    hlen: usize,
    level: u8,
    plan: &[Option<u8>],
) -> Result<Vec<u8>, Violation> {
    let body = &whole[hlen..];
    let mut r = Reader::new(body);
    r.u16()?;
    if level == 5 {
        let n = r.varint()?;
        r.take(n)?;
    }
    let (head, mut granted) = (&body[..r.at], r.rest().iter());
    let mut amended = head.to_vec();
    for p in plan {
        match p {
            Some(code) => amended.push(*code),
            None => amended.push(*granted.next().ok_or(Violation::Malformed("SUBACK"))?),
        }
    }
    Ok(packet(whole[0], &amended))
}

/// The packet id of a SUBACK body.
pub fn suback_id(whole: &[u8], hlen: usize) -> Option<u16> {
    whole
        .get(hlen..hlen + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Topics;
    use crate::wire::write_varint;

    fn publish(level: u8, qos: u8, retain: bool, topic: &str, pkid: u16, props: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if level == 5 {
            write_varint(&mut body, props.len());
            body.extend_from_slice(props);
        }
        body.extend_from_slice(b"{}");
        packet(0x30 | (qos << 1) | retain as u8, &body)
    }

    fn subscribe(level: u8, pkid: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if level == 5 {
            body.push(0);
        }
        for f in filters {
            body.extend_from_slice(&(f.len() as u16).to_be_bytes());
            body.extend_from_slice(f.as_bytes());
            body.push(1);
        }
        packet(0x82, &body)
    }

    fn gw1(level: u8) -> Inspector {
        Inspector::new(
            Arc::new(Rules::new(&Topics::default())),
            Identity::device("gw1"),
            level,
            1 << 20,
        )
    }

    #[test]
    fn allowed_publishes_pass_byte_for_byte_and_partial_packets_wait() {
        let mut i = gw1(4);
        let p = publish(4, 1, false, "warren/devices/gw1/telemetry", 7, &[]);
        let mut buf = p[..5].to_vec();
        let out = i.client_bytes(&mut buf).unwrap();
        assert!(out.forward.is_empty() && buf.len() == 5);
        buf.extend_from_slice(&p[5..]);
        buf.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
        let out = i.client_bytes(&mut buf).unwrap();
        assert_eq!(out.forward, [p.as_slice(), &[0xc0, 0x00]].concat());
        assert!(buf.is_empty() && out.reply.is_empty() && out.refused.is_empty());
    }

    #[test]
    fn refused_publishes_are_dropped_and_acknowledged_at_their_qos() {
        for (level, qos, ack) in [
            (4, 1, vec![0x40, 2, 0, 9]),
            (5, 1, vec![0x40, 3, 0, 9, 0x87]),
            (5, 2, vec![0x50, 3, 0, 9, 0x87]),
            (4, 0, vec![]),
        ] {
            let mut i = gw1(level);
            let mut buf = publish(level, qos, true, "warren/devices/gw2/status", 9, &[]);
            let out = i.client_bytes(&mut buf).unwrap();
            assert!(out.forward.is_empty(), "level {level} qos {qos}");
            assert_eq!(out.reply, ack, "level {level} qos {qos}");
            assert_eq!(out.refused[0].what, "retain");
        }
        // 3.1.1 QoS 2: PUBREC now, and the PUBREL that follows is answered, not forwarded.
        let mut i = gw1(4);
        let mut buf = publish(4, 2, false, "warren/tunnels/request", 3, &[]);
        assert_eq!(i.client_bytes(&mut buf).unwrap().reply, [0x50, 2, 0, 3]);
        let mut buf = vec![0x62, 2, 0, 3];
        let out = i.client_bytes(&mut buf).unwrap();
        assert_eq!((out.forward.len(), out.reply), (0, vec![0x70, 2, 0, 3]));
    }

    #[test]
    fn a_topic_alias_cannot_smuggle_a_topic() {
        let mut i = gw1(5);
        let alias = [0x23, 0, 1];
        let mut buf = publish(5, 0, false, "warren/tunnels/request", 0, &alias);
        assert_eq!(i.client_bytes(&mut buf).unwrap().refused.len(), 1);
        let mut buf = publish(5, 0, false, "", 0, &alias);
        assert_eq!(i.client_bytes(&mut buf).unwrap().refused.len(), 1);
        let mut buf = publish(5, 0, false, "", 0, &[0x23, 0, 2]);
        assert!(i.client_bytes(&mut buf).is_err());
    }

    #[test]
    fn subscribe_failures_reach_the_suback_whole_or_amended() {
        let mut i = gw1(4);
        let mut buf = subscribe(4, 5, &["warren/agents/gw2/#", "#"]);
        let out = i.client_bytes(&mut buf).unwrap();
        assert!(out.forward.is_empty());
        assert_eq!(out.reply, [0x90, 4, 0, 5, 0x80, 0x80]);

        let mut i = gw1(5);
        let mut buf = subscribe(5, 6, &["warren/agents/gw2/offer", "warren/agents/gw1/+"]);
        let out = i.client_bytes(&mut buf).unwrap();
        assert_eq!(out.forward, subscribe(5, 6, &["warren/agents/gw1/+"]));
        let (pkid, plan) = out.suback_plan.unwrap();
        assert_eq!((pkid, plan.clone()), (6, vec![Some(0x87), None]));
        let suback = [0x90, 4, 0, 6, 0, 1];
        assert_eq!(
            amend_suback(&suback, 2, 5, &plan).unwrap(),
            [0x90, 5, 0, 6, 0, 0x87, 1]
        );
    }

    #[test]
    fn a_login_that_keeps_trying_is_cut_off_for_a_while_and_reports_are_thinned() {
        let strikes = Strikes::default();
        let now = Instant::now();
        let mut reported = 0;
        for n in 0..MAX_STRIKES {
            let s = strikes.record("gw1", now);
            assert!(!s.cut, "strike {n}");
            reported += s.report as usize;
        }
        assert_eq!(reported, REFUSALS_IN_FULL);
        assert!(!strikes.cut_off("gw1", now));
        assert!(strikes.record("gw1", now).cut);
        assert!(strikes.cut_off("gw1", now + CUT_OFF_FOR / 2));
        assert!(!strikes.cut_off("gw1", now + CUT_OFF_FOR * 2));
        assert!(
            !strikes.cut_off("gw2", now),
            "one login's strikes are its own"
        );
        // Strikes age out of the window.
        for _ in 0..MAX_STRIKES {
            assert!(!strikes.record("gw2", now).cut);
        }
        assert!(!strikes.record("gw2", now + STRIKE_WINDOW * 2).cut);
    }

    #[test]
    fn garbage_ends_the_connection() {
        let mut i = gw1(4);
        for bad in [
            vec![0x30, 0xff, 0xff, 0xff, 0xff],
            vec![0x10, 0],
            vec![0x36, 2, 0, 0],
        ] {
            assert!(i.client_bytes(&mut bad.clone()).is_err(), "{bad:?}");
        }
        assert!(matches!(
            i.client_bytes(&mut vec![0x30, 0xff, 0xff, 0x7f]),
            Err(Violation::TooLarge(_))
        ));
    }
}

/// What the front door forwards must read, in rumqttd's own parser, as what was judged.
#[cfg(test)]
mod differential {
    use super::*;
    use crate::acl::Identity;
    use crate::topic::Topics;
    use crate::wire::write_varint;
    use rumqttd::protocol::{Packet, Protocol};

    fn rumqttd_reads(level: u8, bytes: &[u8]) -> Packet {
        let mut buf = bytes::BytesMut::from(bytes);
        let read = match level {
            5 => rumqttd::protocol::v5::V5.read_mut(&mut buf, 1 << 20),
            _ => rumqttd::protocol::v4::V4.read_mut(&mut buf, 1 << 20),
        };
        read.expect("rumqttd reads what the front door forwards")
    }

    fn gw1(level: u8) -> Inspector {
        let rules = Arc::new(Rules::new(&Topics::default()));
        Inspector::new(rules, Identity::device("gw1"), level, 1 << 20)
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn a_subscribe_whose_properties_rumqttd_would_misread_reaches_it_rewritten() {
        // Properties declared 3 bytes long, which rumqttd 0.20 counts one byte short:
        // copied as they are, it would read the filters from another offset.
        let mut body = vec![0x00, 0x01, 0x03, 0x0b, 0x01, 0x01];
        body.extend(string(b"warren/agents/gw1/offer"));
        body.push(0x01);
        body.extend(string(b"warren/agents/gw1/revoke"));
        body.push(0x01);
        let mut buf = packet(0x82, &body);
        // As sent, rumqttd does not read the filters that were judged.
        let mut raw = bytes::BytesMut::from(&buf[..]);
        let misread = match rumqttd::protocol::v5::V5.read_mut(&mut raw, 1 << 20) {
            Ok(Packet::Subscribe(sub, _)) => {
                sub.filters.len() != 2 || sub.filters[0].path != "warren/agents/gw1/offer"
            }
            _ => true,
        };
        assert!(
            misread,
            "rumqttd reads these properties right; the test shows nothing"
        );
        let out = gw1(5).client_bytes(&mut buf).unwrap();
        let Packet::Subscribe(sub, _) = rumqttd_reads(5, &out.forward) else {
            panic!("not a SUBSCRIBE");
        };
        let paths: Vec<&str> = sub.filters.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            ["warren/agents/gw1/offer", "warren/agents/gw1/revoke"]
        );
    }

    #[test]
    fn the_reviewers_subscribe_that_smuggled_a_hash_is_cut() {
        let mut body = vec![0x00, 0x01, 0x03, 0x0b, 0x01, 0x01];
        let mut a = b"warren/agents/gw1/".to_vec();
        a.extend(std::iter::repeat_n(b'A', 238));
        a.extend([0, 0, 1]);
        body.extend(string(&a));
        body.push(0x23);
        let mut b = b"$share/".to_vec();
        b.extend(std::iter::repeat_n(b'g', 9482));
        b.extend(b"/warren/agents/gw1/x");
        body.extend(string(&b));
        body.push(0x00);
        let mut buf = packet(0x82, &body);
        match gw1(5).client_bytes(&mut buf) {
            Err(_) => {}
            Ok(out) => {
                if !out.forward.is_empty() {
                    let Packet::Subscribe(sub, _) = rumqttd_reads(5, &out.forward) else {
                        panic!("not a SUBSCRIBE");
                    };
                    assert!(sub
                        .filters
                        .iter()
                        .all(|f| f.path.starts_with("warren/agents/gw1/")));
                }
            }
        }
    }

    #[test]
    fn a_publish_by_alias_reaches_rumqttd_with_its_topic_and_no_alias() {
        let mut i = gw1(5);
        let mut body = string(b"warren/devices/gw1/telemetry");
        body.extend([0x00, 0x07]); // packet id, QoS 1
        let props = [0x23, 0x00, 0x01, 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'];
        write_varint(&mut body, props.len());
        body.extend(props);
        body.extend(b"{}");
        let mut buf = packet(0x32, &body);
        buf.extend(packet(
            0x32,
            &[
                &string(b"")[..],
                &[0x00, 0x08, 0x03, 0x23, 0x00, 0x01],
                b"{}",
            ]
            .concat(),
        ));
        let out = i.client_bytes(&mut buf).unwrap();
        let mut rest = bytes::BytesMut::from(&out.forward[..]);
        for _ in 0..2 {
            let Ok(Packet::Publish(p, props)) =
                rumqttd::protocol::v5::V5.read_mut(&mut rest, 1 << 20)
            else {
                panic!("not a PUBLISH");
            };
            assert_eq!(&p.topic[..], b"warren/devices/gw1/telemetry");
            assert!(
                props.is_none_or(|p| p.topic_alias.is_none()),
                "an alias reached rumqttd"
            );
        }
    }

    #[test]
    fn a_connect_whose_will_properties_rumqttd_would_misread_reaches_it_rewritten() {
        // Will properties that rumqttd would read as a 29-byte response topic, taking the
        // real will topic with them and finding gw2's status in the payload.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0xc6 | 0x20, 0, 30, 0];
        body.extend(string(b"gw1"));
        body.extend([0x03, 0x08, 0x00, 0x1d]);
        body.extend(string(b"warren/devices/gw1/status"));
        let mut payload = string(b"warren/devices/gw2/status");
        payload.extend(string(b"{\"state\":\"offline\"}"));
        body.extend(string(&payload));
        body.extend(string(b"gw1"));
        body.extend(string(b"secret"));
        let pkt = packet(0x10, &body);
        // As sent, rumqttd takes another will topic than the one judged.
        if let Packet::Connect(_, _, Some(will), _, _) = rumqttd_reads(5, &pkt) {
            assert_ne!(
                &will.topic[..],
                b"warren/devices/gw1/status",
                "nothing to show"
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let c = rt
            .block_on(crate::connect::read_connect(&mut pkt.as_slice()))
            .unwrap();
        assert_eq!(c.will, Some(("warren/devices/gw1/status".to_owned(), true)));
        let again = c.rewrite_as("gw1|gw1", "gw1", "internal", true);
        let Packet::Connect(connect, _, Some(will), _, login) = rumqttd_reads(5, &again) else {
            panic!("not a CONNECT with a will");
        };
        assert_eq!(&will.topic[..], b"warren/devices/gw1/status");
        assert_eq!(connect.client_id, "gw1|gw1");
        assert!(connect.clean_session, "the session is made clean");
        assert_eq!(login.map(|l| l.password), Some("internal".to_owned()));
    }
}
