//! One tunnel on the agent's side: a pool of authenticated data connections to the
//! relay, each spliced to the target when the relay says GO, and the agent's own timer,
//! which ends the tunnel even if the relay is gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use warren_bus::auth::DeviceKey;
use warren_bus::client::backoff;
use warren_bus::handshake::{prove, GO};
use warren_bus::message::Offer;
use warren_bus::DeviceId;

/// A byte stream to the relay (TLS or plain).
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// What every session shares.
pub struct Ctx {
    /// This device.
    pub device: DeviceId,
    /// Its key.
    pub key: DeviceKey,
    /// TLS towards the relay.
    pub tls: TlsConnector,
    /// Idle data connections per tunnel.
    pub pool: usize,
    /// Deadline for dialling.
    pub dial_timeout: Duration,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The agent's own timer fired.
    Expired,
    /// The relay revoked it, or the agent is stopping.
    Cancelled,
}

/// Runs one tunnel until its deadline (which an extension may move) or `cancel`.
pub async fn run(
    ctx: Arc<Ctx>,
    offer: Offer,
    target: String,
    mut deadline: watch::Receiver<Instant>,
    cancel: CancellationToken,
) -> End {
    let tracker = TaskTracker::new();
    let conns = cancel.child_token();
    let offer = Arc::new(offer);
    let target = Arc::new(target);
    for slot in 0..ctx.pool {
        let (ctx, offer, target, conns2, tracker2) = (
            ctx.clone(),
            offer.clone(),
            target.clone(),
            conns.clone(),
            tracker.clone(),
        );
        tracker.spawn(
            keep_one_ready(ctx, offer, target, conns2, tracker2)
                .instrument(tracing::debug_span!("pool", slot)),
        );
    }
    let end = loop {
        let at = *deadline.borrow_and_update();
        tokio::select! {
            _ = cancel.cancelled() => break End::Cancelled,
            _ = sleep_until(at) => break End::Expired,
            changed = deadline.changed() => if changed.is_err() { break End::Cancelled },
        }
    };
    conns.cancel();
    tracker.close();
    if timeout(Duration::from_secs(1), tracker.wait())
        .await
        .is_err()
    {
        warn!("connections did not close in time");
    }
    end
}

/// Keeps one authenticated data connection ready; when it is used, splices it and dials
/// the next one.
async fn keep_one_ready(
    ctx: Arc<Ctx>,
    offer: Arc<Offer>,
    target: Arc<String>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut failures = 0u32;
    loop {
        let ready = tokio::select! {
            _ = cancel.cancelled() => return,
            r = timeout(ctx.dial_timeout, dial(&ctx, &offer)) => r,
        };
        let mut stream = match ready {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "data connection failed");
                if !pause(&cancel, &mut failures).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                warn!("dialling the relay timed out");
                if !pause(&cancel, &mut failures).await {
                    return;
                }
                continue;
            }
        };
        failures = 0;
        let mut signal = [0u8; 1];
        let go = tokio::select! {
            _ = cancel.cancelled() => return,
            r = stream.read_exact(&mut signal) => r,
        };
        match go {
            Ok(_) if signal[0] == GO => {
                let (target, cancel) = (target.clone(), cancel.clone());
                tracker.spawn(
                    async move { serve_operator(stream, &target, cancel).await }
                        .instrument(tracing::info_span!("conn", side = "target")),
                );
            }
            Ok(_) => warn!(
                byte = signal[0],
                "relay sent an unknown signal; connection dropped"
            ),
            Err(_) => {
                debug!("relay closed an idle data connection");
                if !pause(&cancel, &mut failures).await {
                    return;
                }
            }
        }
    }
}

/// Waits the backoff for the next attempt; false when cancelled meanwhile.
async fn pause(cancel: &CancellationToken, failures: &mut u32) -> bool {
    let wait = backoff(*failures);
    *failures = failures.saturating_add(1);
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

async fn dial(ctx: &Ctx, offer: &Offer) -> anyhow::Result<Box<dyn Stream>> {
    let addr = format!("{}:{}", bracket(&offer.relay_host), offer.agent_port);
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("could not connect to {addr}: {e}"))?;
    tcp.set_nodelay(true)?;
    let mut s: Box<dyn Stream> = if offer.tls {
        let name = rustls::pki_types::ServerName::try_from(offer.relay_host.clone())
            .map_err(|_| anyhow::anyhow!("{:?} is not a host name", offer.relay_host))?;
        Box::new(
            ctx.tls
                .connect(name, tcp)
                .await
                .map_err(|e| anyhow::anyhow!("TLS with {addr}: {e}"))?,
        )
    } else {
        Box::new(tcp)
    };
    prove(&mut s, &ctx.device, &offer.tunnel, &offer.nonce, &ctx.key).await?;
    debug!(%addr, "data connection ready");
    Ok(s)
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

async fn serve_operator(mut data: Box<dyn Stream>, target: &str, cancel: CancellationToken) {
    let mut t = match timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return warn!(%target, error = %e, "could not connect to the target; operator connection closed")
        }
        Err(_) => {
            return warn!(%target, "connecting to the target timed out; operator connection closed")
        }
    };
    let _ = t.set_nodelay(true);
    info!(%target, "operator connected to the target");
    tokio::select! {
        _ = cancel.cancelled() => debug!("cut off by the tunnel's end"),
        r = tokio::io::copy_bidirectional_with_sizes(&mut data, &mut t, 16 * 1024, 16 * 1024) => match r {
            Ok((up, down)) => info!(up, down, "operator connection closed"),
            Err(e) => info!(error = %e, "operator connection ended"),
        },
    }
}
