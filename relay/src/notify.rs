//! The notifier — the "tell the user by mail" step: each alert goes, as one JSON object,
//! to a configured command's stdin and/or as an HTTP POST to a webhook, each with a
//! timeout and a few retries. Runs in the background; the relay never waits for it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

/// Attempts per alert and channel.
pub const ATTEMPTS: u32 = 3;

/// Where alerts go.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Program and arguments.
    pub command: Option<Vec<String>>,
    /// `http://host[:port]/path`.
    pub webhook: Option<Webhook>,
    /// Deadline per attempt.
    pub timeout: Duration,
    /// Wait before the first retry (doubles each time).
    pub retry_after: Duration,
}

/// A parsed `http://` webhook address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    host: String,
    port: u16,
    path: String,
}

impl std::str::FromStr for Webhook {
    type Err = anyhow::Error;
    fn from_str(url: &str) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!(
                "webhook {url:?}: only http:// is supported (put a TLS proxy in front for https)"
            );
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .with_context(|| format!("webhook {url:?}: bad port {p:?}"))?,
            ),
            _ => (authority, 80),
        };
        if host.is_empty() || host.contains(['@', ' ', ':']) || path.contains([' ', '\r', '\n']) {
            bail!("webhook {url:?}: write http://HOST[:PORT]/PATH");
        }
        Ok(Webhook {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

impl Notifier {
    /// Sends `payload` everywhere configured, in the background.
    pub fn send(&self, payload: Vec<u8>) {
        if let Some(cmd) = self.command.clone() {
            let (payload, me) = (payload.clone(), self.clone());
            tokio::spawn(async move {
                me.retry("notify command", || run_command(&cmd, &payload, me.timeout))
                    .await
            });
        }
        if let Some(hook) = self.webhook.clone() {
            let me = self.clone();
            tokio::spawn(async move {
                me.retry("webhook", || post(&hook, &payload, me.timeout))
                    .await
            });
        }
    }

    async fn retry<F, Fut>(&self, what: &str, mut attempt: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut wait = self.retry_after;
        for n in 1..=ATTEMPTS {
            match attempt().await {
                Ok(()) => return info!(attempt = n, "alert sent to the {what}"),
                Err(e) if n < ATTEMPTS => {
                    warn!(attempt = n, error = %format!("{e:#}"), retry_in = ?wait, "{what} failed");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => {
                    warn!(attempts = n, error = %format!("{e:#}"), "{what} failed; alert not delivered there")
                }
            }
        }
    }
}

async fn run_command(cmd: &[String], payload: &[u8], deadline: Duration) -> anyhow::Result<()> {
    let (program, args) = cmd.split_first().context("empty notify_command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("could not start {program}"))?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(payload).await?;
            stdin.write_all(b"\n").await?;
        }
        child.wait().await
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => bail!("{program} exited with {status}"),
        Ok(Err(e)) => Err(e).with_context(|| program.clone()),
        Err(_) => bail!("{program} timed out after {deadline:?}; killed"),
    }
}

async fn post(hook: &Webhook, payload: &[u8], deadline: Duration) -> anyhow::Result<()> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect((hook.host.as_str(), hook.port))
            .await
            .with_context(|| format!("could not connect to {}:{}", hook.host, hook.port))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: warren-relay/{}\r\n\r\n",
            hook.path,
            hook.host,
            payload.len(),
            env!("CARGO_PKG_VERSION")
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(payload).await?;
        // The status line is all we need; read a little, bounded.
        let mut buf = vec![0u8; 512];
        let mut got = 0;
        while got < buf.len() && !buf[..got].contains(&b'\n') {
            let n = s.read(&mut buf[got..]).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let line = String::from_utf8_lossy(&buf[..got]);
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .context("no HTTP status line in the answer")?;
        if !(200..300).contains(&status) {
            bail!("the webhook answered {status}");
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {deadline:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_addresses_parse() {
        let w: Webhook = "http://hooks.example:8080/warren/alert".parse().unwrap();
        assert_eq!(
            w,
            Webhook {
                host: "hooks.example".into(),
                port: 8080,
                path: "/warren/alert".into()
            }
        );
        let w: Webhook = "http://hooks.example".parse().unwrap();
        assert_eq!((w.port, w.path.as_str()), (80, "/"));
        for bad in [
            "https://x/",
            "ftp://x",
            "http://:80/",
            "http://h:0/",
            "http://u@h/",
        ] {
            assert!(bad.parse::<Webhook>().is_err(), "{bad}");
        }
    }
}
