//! Just enough of MQTT to read a CONNECT packet (3.1.1 or 5), take out its login, and
//! write it anew with other credentials; and the CONNACK that refuses one.
//!
//! The CONNECT rumqttd sees is always built here from the fields read, never copied:
//! rumqttd 0.20 reads MQTT 5 property blocks with a running count that can end away
//! from their declared length, so a copied block could make it read a client id or a
//! will topic other than the one judged here. MQTT 5 connect and will properties are
//! therefore dropped (none of them changes what Warren's clients get).

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::wire::{packet, Reader};

/// The largest CONNECT read (will payload included).
pub const MAX_CONNECT_LEN: usize = 64 * 1024;

/// A parsed CONNECT.
#[derive(Debug, Clone)]
pub struct Connect {
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.
    pub level: u8,
    /// The client id.
    pub client_id: String,
    /// The username, if any.
    pub username: Option<String>,
    /// The password, if any.
    pub password: Option<Vec<u8>>,
    /// The last will's topic and whether it is retained, if there is a will.
    pub will: Option<(String, bool)>,
    /// Clean session (3.1.1) or clean start (5): the broker keeps nothing for it.
    pub clean: bool,
    flags: u8,
    keep_alive: u16,
    will_payload: Vec<u8>,
}

/// Why a CONNECT was refused before any policy looked at it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not MQTT, an unknown version, or a malformed packet.
    #[error("not an MQTT 3.1.1/5 CONNECT: {0}")]
    Malformed(&'static str),
    /// Bigger than [`MAX_CONNECT_LEN`].
    #[error("CONNECT of {0} bytes is over the limit")]
    TooLarge(usize),
}

impl From<crate::wire::Malformed> for ConnectError {
    fn from(what: crate::wire::Malformed) -> Self {
        ConnectError::Malformed(what)
    }
}

/// Reads one CONNECT packet from a fresh connection.
pub async fn read_connect<S: AsyncRead + Unpin>(s: &mut S) -> Result<Connect, ConnectError> {
    if s.read_u8().await? != 0x10 {
        return Err(ConnectError::Malformed("first packet is not CONNECT"));
    }
    let mut len = 0usize;
    for i in 0..4 {
        let b = s.read_u8().await?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(ConnectError::Malformed("bad length"));
        }
    }
    if len > MAX_CONNECT_LEN {
        return Err(ConnectError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    parse(body)
}

fn parse(body: Vec<u8>) -> Result<Connect, ConnectError> {
    let mut c = Reader::new(&body);
    if c.binary()? != b"MQTT" {
        return Err(ConnectError::Malformed("protocol name is not MQTT"));
    }
    let level = c.u8()?;
    if level != 4 && level != 5 {
        return Err(ConnectError::Malformed("protocol level is not 4 or 5"));
    }
    let flags = c.u8()?;
    if flags & 0x01 != 0 {
        return Err(ConnectError::Malformed("reserved flag set"));
    }
    let keep_alive = c.u16()?;
    if level == 5 {
        c.properties()?;
    }
    let client_id = c.str()?.to_owned();
    let mut will_payload = Vec::new();
    let will = if flags & 0x04 != 0 {
        if level == 5 {
            c.properties()?;
        }
        let topic = c.str()?.to_owned();
        will_payload = c.binary()?.to_vec();
        Some((topic, flags & 0x20 != 0))
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(c.str()?.to_owned())
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(c.binary()?.to_vec())
    } else {
        None
    };
    Ok(Connect {
        level,
        client_id,
        username,
        password,
        will,
        clean: flags & 0x02 != 0,
        flags,
        keep_alive,
        will_payload,
    })
}

impl Connect {
    /// The packet anew, with `username` and `password` in place of the client's.
    pub fn rewrite(&self, username: &str, password: &str) -> Vec<u8> {
        self.rewrite_as(&self.client_id, username, password, false)
    }

    /// The packet anew from the fields read, under another client id, with `username`
    /// and `password`, and with a clean session if `clean` (whatever the client asked).
    pub fn rewrite_as(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
        clean: bool,
    ) -> Vec<u8> {
        // Keep the will's flag, QoS and retain; set both credential flags.
        let mut flags = (self.flags & 0x3e) | 0xc0;
        if clean {
            flags |= 0x02;
        }
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', self.level, flags];
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.level == 5 {
            body.push(0); // no properties
        }
        let field = |body: &mut Vec<u8>, f: &[u8]| {
            body.extend_from_slice(&(f.len() as u16).to_be_bytes());
            body.extend_from_slice(f);
        };
        field(&mut body, client_id.as_bytes());
        if let Some((topic, _)) = &self.will {
            if self.level == 5 {
                body.push(0); // no will properties
            }
            field(&mut body, topic.as_bytes());
            field(&mut body, &self.will_payload);
        }
        field(&mut body, username.as_bytes());
        field(&mut body, password.as_bytes());
        packet(0x10, &body)
    }

    /// A CONNACK refusing this client: bad credentials, or not authorized.
    pub fn refusal(&self, bad_credentials: bool) -> Vec<u8> {
        match (self.level, bad_credentials) {
            (5, true) => vec![0x20, 0x03, 0x00, 0x86, 0x00],
            (5, false) => vec![0x20, 0x03, 0x00, 0x87, 0x00],
            (_, true) => vec![0x20, 0x02, 0x00, 0x04],
            (_, false) => vec![0x20, 0x02, 0x00, 0x05],
        }
    }
}

/// A minimal clean-session CONNECT (keep-alive 30 s) with a login, for readiness probes.
pub fn minimal_connect(level: u8, client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0xc2, 0, 30];
    if level == 5 {
        body.push(0); // no properties
    }
    for field in [client_id, username, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    packet(0x10, &body)
}

/// DISCONNECT, for MQTT 3.1.1 and 5 alike.
pub const DISCONNECT: [u8; 2] = [0xe0, 0x00];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::write_varint;

    fn v4_connect(client: &str, user: Option<&str>, pass: Option<&str>, will: bool) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
        let mut flags = 0x02;
        if will {
            flags |= 0x04;
        }
        if user.is_some() {
            flags |= 0x80;
        }
        if pass.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&[0, 30]);
        let mut s = |x: &str| {
            body.extend_from_slice(&(x.len() as u16).to_be_bytes());
            body.extend_from_slice(x.as_bytes());
        };
        s(client);
        if will {
            s("w/t");
            s("bye");
        }
        if let Some(u) = user {
            s(u);
        }
        if let Some(p) = pass {
            s(p);
        }
        let mut pkt = vec![0x10];
        write_varint(&mut pkt, body.len());
        pkt.extend(body);
        pkt
    }

    #[tokio::test]
    async fn a_connect_is_read_and_rewritten_with_new_credentials() {
        let pkt = v4_connect("gw1", Some("gw1"), Some("secret"), true);
        let c = read_connect(&mut pkt.as_slice()).await.unwrap();
        assert_eq!(c.client_id, "gw1");
        assert_eq!(c.username.as_deref(), Some("gw1"));
        assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
        let again = c.rewrite("gw1", "internal");
        let c2 = read_connect(&mut again.as_slice()).await.unwrap();
        assert_eq!(c2.username.as_deref(), Some("gw1"));
        assert_eq!(c2.password.as_deref(), Some(&b"internal"[..]));
        assert_eq!(
            again,
            v4_connect("gw1", Some("gw1"), Some("internal"), true)
        );
    }

    #[tokio::test]
    async fn a_connect_moves_to_another_client_id_keeping_its_will() {
        let pkt = v4_connect("mosq-1", Some("ops"), Some("pw"), true);
        let c = read_connect(&mut pkt.as_slice()).await.unwrap();
        assert_eq!(c.will, Some(("w/t".to_owned(), false)));
        let again = c.rewrite_as("ops|mosq-1", "ops", "internal", false);
        assert_eq!(
            again,
            v4_connect("ops|mosq-1", Some("ops"), Some("internal"), true)
        );
    }

    #[tokio::test]
    async fn a_minimal_connect_parses() {
        for level in [4, 5] {
            let pkt = minimal_connect(level, "probe", "u", "p");
            let c = read_connect(&mut pkt.as_slice()).await.unwrap();
            assert_eq!((c.level, c.client_id.as_str()), (level, "probe"));
            assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
        }
    }

    #[tokio::test]
    async fn an_anonymous_connect_gains_credentials() {
        let pkt = v4_connect("mosq-1", None, None, false);
        let c = read_connect(&mut pkt.as_slice()).await.unwrap();
        assert_eq!(c.username, None);
        let again = c.rewrite("anonymous", "x");
        assert_eq!(
            again,
            v4_connect("mosq-1", Some("anonymous"), Some("x"), false)
        );
    }

    #[tokio::test]
    async fn garbage_and_huge_lengths_are_refused() {
        let e = read_connect(&mut &[0x30u8, 0][..]).await.unwrap_err();
        assert!(matches!(e, ConnectError::Malformed(_)));
        let e = read_connect(&mut &[0x10u8, 0xff, 0xff, 0xff, 0x7f][..])
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::TooLarge(_)));
        let mut pkt = v4_connect("c", Some("u"), Some("p"), false);
        pkt.truncate(pkt.len() - 2);
        pkt[1] -= 2;
        let e = read_connect(&mut pkt.as_slice()).await.unwrap_err();
        assert!(matches!(e, ConnectError::Malformed("truncated")), "{e}");
    }
}
