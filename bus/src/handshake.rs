//! The data-connection handshake: how an agent proves, on each connection it dials to a
//! tunnel's agent port, that it holds the device key.
//!
//! ```text
//! relay → agent   "WRN1" ‖ challenge (32 random bytes, fresh per connection)
//! agent → relay   len: u32 BE ‖ JSON {tunnel, device, proof}       (len ≤ 1024)
//!                 proof = HMAC(key, "data", device, tunnel, offer nonce, challenge)
//! relay → agent   ACCEPTED (1 byte)            — or the connection is closed
//! …idle in the agent's pool until…
//! relay → agent   GO (1 byte): an operator is connected; splice from here on
//! ```
//!
//! The challenge makes a captured handshake worthless on any other connection, the
//! nonce binds it to one tunnel's offer. Deadlines are the caller's (`tokio::time::timeout`).

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::DeviceKey;
use crate::id::{DeviceId, TunnelId};

/// Opens every handshake, and names its version.
pub const MAGIC: &[u8; 4] = b"WRN1";
/// The relay's answer to a good proof.
pub const ACCEPTED: u8 = 0x01;
/// The relay's signal that an operator connection is paired with this data connection.
pub const GO: u8 = 0x02;
/// The largest hello the relay reads; anything longer is refused before allocating it.
pub const MAX_HELLO_LEN: u32 = 1024;

/// What the agent sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The tunnel this connection serves.
    pub tunnel: TunnelId,
    /// The device that dials.
    pub device: DeviceId,
    /// The proof, hex.
    pub proof: String,
}

/// What the relay expects on one agent port.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// The tunnel the port belongs to.
    pub tunnel: &'a TunnelId,
    /// The device it was offered to.
    pub device: &'a DeviceId,
    /// That device's key.
    pub key: &'a DeviceKey,
    /// The offer's nonce.
    pub nonce: &'a str,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or closed early.
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not speak this protocol.
    #[error("the peer does not speak the Warren data protocol")]
    BadMagic,
    /// The hello's length field is over [`MAX_HELLO_LEN`].
    #[error("hello of {0} bytes refused (limit {MAX_HELLO_LEN})")]
    TooLong(u32),
    /// The hello is not the JSON expected.
    #[error("malformed hello: {0}")]
    Malformed(String),
    /// The hello names another tunnel or device.
    #[error("hello is for tunnel {tunnel} of {device}, not this port's")]
    WrongTunnel {
        /// The tunnel named.
        tunnel: TunnelId,
        /// The device named.
        device: DeviceId,
    },
    /// The proof does not match.
    #[error("wrong proof")]
    BadProof,
    /// The relay closed the connection instead of accepting.
    #[error("the relay refused the proof")]
    Refused,
}

fn proof_parts<'a>(device: &'a str, tunnel: &'a str, nonce: &'a str, ch: &'a str) -> [&'a str; 5] {
    ["data", device, tunnel, nonce, ch]
}

/// Relay side: challenge the agent and check its proof.
pub async fn accept_agent<S>(stream: &mut S, expected: &Expected<'_>) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let challenge: [u8; 32] = rand::random();
    let mut opening = [0u8; 36];
    opening[..4].copy_from_slice(MAGIC);
    opening[4..].copy_from_slice(&challenge);
    stream.write_all(&opening).await?;
    stream.flush().await?;

    let len = stream.read_u32().await?;
    if len > MAX_HELLO_LEN {
        return Err(HandshakeError::TooLong(len));
    }
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).await?;
    let hello: Hello =
        serde_json::from_slice(&buf).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    if &hello.tunnel != expected.tunnel || &hello.device != expected.device {
        return Err(HandshakeError::WrongTunnel {
            tunnel: hello.tunnel,
            device: hello.device,
        });
    }
    let ch = hex::encode(challenge);
    let parts = proof_parts(
        expected.device.as_str(),
        expected.tunnel.as_str(),
        expected.nonce,
        &ch,
    );
    if !expected.key.verify(&parts, &hello.proof) {
        return Err(HandshakeError::BadProof);
    }
    stream.write_all(&[ACCEPTED]).await?;
    stream.flush().await?;
    Ok(())
}

/// Agent side: answer the relay's challenge and wait to be accepted.
pub async fn prove<S>(
    stream: &mut S,
    device: &DeviceId,
    tunnel: &TunnelId,
    nonce: &str,
    key: &DeviceKey,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut opening = [0u8; 36];
    stream.read_exact(&mut opening).await?;
    if &opening[..4] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let ch = hex::encode(&opening[4..]);
    let proof = key.sign(&proof_parts(device.as_str(), tunnel.as_str(), nonce, &ch));
    let hello = serde_json::to_vec(&Hello {
        tunnel: tunnel.clone(),
        device: device.clone(),
        proof,
    })
    .expect("a hello always serializes");
    let mut frame = Vec::with_capacity(4 + hello.len());
    frame.extend_from_slice(&(hello.len() as u32).to_be_bytes());
    frame.extend_from_slice(&hello);
    stream.write_all(&frame).await?;
    stream.flush().await?;
    match stream.read_u8().await {
        Ok(ACCEPTED) => Ok(()),
        Ok(_) => Err(HandshakeError::Refused),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeError::Refused),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    struct Fixture {
        tunnel: TunnelId,
        device: DeviceId,
        key: DeviceKey,
    }

    fn fixture() -> Fixture {
        Fixture {
            tunnel: "t1".parse().unwrap(),
            device: "gw1".parse().unwrap(),
            key: DeviceKey::generate(),
        }
    }

    impl Fixture {
        fn expected(&self) -> Expected<'_> {
            Expected {
                tunnel: &self.tunnel,
                device: &self.device,
                key: &self.key,
                nonce: "n1",
            }
        }
    }

    #[tokio::test]
    async fn the_right_key_is_accepted_over_a_tiny_buffer() {
        let f = fixture();
        let (mut a, mut b) = duplex(8);
        let expected = f.expected();
        let (relay, agent) = tokio::join!(
            accept_agent(&mut a, &expected),
            prove(&mut b, &f.device, &f.tunnel, "n1", &f.key)
        );
        relay.unwrap();
        agent.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_key_or_nonce_is_refused() {
        let f = fixture();
        for (key, nonce) in [(DeviceKey::generate(), "n1"), (f.key.clone(), "n2")] {
            let (mut a, mut b) = duplex(64);
            let agent = tokio::spawn({
                let (d, t) = (f.device.clone(), f.tunnel.clone());
                async move { prove(&mut b, &d, &t, nonce, &key).await }
            });
            let relay = accept_agent(&mut a, &f.expected()).await;
            assert!(matches!(relay, Err(HandshakeError::BadProof)), "{relay:?}");
            drop(a);
            assert!(matches!(agent.await.unwrap(), Err(HandshakeError::Refused)));
        }
    }

    #[tokio::test]
    async fn a_huge_length_field_is_refused_without_reading_it() {
        let f = fixture();
        let (mut a, mut b) = duplex(64);
        let attacker = tokio::spawn(async move {
            let mut opening = [0u8; 36];
            b.read_exact(&mut opening).await.unwrap();
            b.write_all(&[0xff, 0xff, 0xff, 0xff, 0x00]).await.unwrap();
            b
        });
        let relay = accept_agent(&mut a, &f.expected()).await;
        assert!(
            matches!(relay, Err(HandshakeError::TooLong(0xffff_ffff))),
            "{relay:?}"
        );
        drop(attacker.await);
    }

    #[tokio::test]
    async fn a_replayed_hello_fails_against_a_fresh_challenge() {
        let f = fixture();
        // Capture the bytes of one good handshake…
        let (mut a, mut b) = duplex(4096);
        let (d, t, k) = (f.device.clone(), f.tunnel.clone(), f.key.clone());
        let agent = tokio::spawn(async move {
            let mut opening = [0u8; 36];
            b.read_exact(&mut opening).await.unwrap();
            let ch = hex::encode(&opening[4..]);
            let proof = k.sign(&proof_parts(d.as_str(), t.as_str(), "n1", &ch));
            let hello = serde_json::to_vec(&Hello {
                tunnel: t,
                device: d,
                proof,
            })
            .unwrap();
            let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&hello);
            b.write_all(&frame).await.unwrap();
            (frame, b)
        });
        accept_agent(&mut a, &f.expected()).await.unwrap();
        let (frame, _b) = agent.await.unwrap();
        // …and send them again on a new connection.
        let (mut a2, mut b2) = duplex(4096);
        let replay = tokio::spawn(async move {
            let mut opening = [0u8; 36];
            b2.read_exact(&mut opening).await.unwrap();
            b2.write_all(&frame).await.unwrap();
            b2
        });
        let relay = accept_agent(&mut a2, &f.expected()).await;
        assert!(matches!(relay, Err(HandshakeError::BadProof)), "{relay:?}");
        drop(replay.await);
    }
}
