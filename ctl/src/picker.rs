//! Choosing on a terminal: first a device (the patent's screen G1), then a destination
//! on it (G2). Used by `open`, `ssh` and `forward` when no device is named.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context};
use warren_bus::message::{DeviceInfo, TargetHealth};
use warren_bus::{encode_enum, DeviceId, QueryKind, TargetName};

use crate::session::Session;

/// Whether both ends of a conversation are a terminal.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks for a number between 1 and `n` until one is given (or input ends). An empty
/// answer means `default`, when there is one.
fn choose(prompt: &str, n: usize, default: Option<usize>) -> anyhow::Result<usize> {
    let stdin = std::io::stdin();
    loop {
        eprint!("{prompt}");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        if stdin
            .lock()
            .read_line(&mut line)
            .context("reading the choice")?
            == 0
        {
            bail!("no choice made (end of input)");
        }
        let line = line.trim();
        if line.is_empty() {
            if let Some(d) = default {
                return Ok(d);
            }
            continue;
        }
        match line.parse::<usize>() {
            Ok(k) if (1..=n).contains(&k) => return Ok(k - 1),
            _ => eprintln!("  type a number from 1 to {n}"),
        }
    }
}

/// Runs `f` on a blocking thread while the session keeps draining the bus.
async fn ask<T: Send + 'static>(
    sess: &mut Session,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let task = tokio::task::spawn_blocking(f);
    match sess.while_running(task, |_| None::<()>).await {
        Ok(r) => r.context("the picker stopped")?,
        Err(()) => bail!("interrupted"),
    }
}

/// Picks a device (online ones first), then one of its targets.
pub async fn pick(
    sess: &mut Session,
    device: Option<DeviceId>,
    target: Option<TargetName>,
) -> anyhow::Result<(DeviceId, Option<TargetName>)> {
    let mut devices: Vec<DeviceInfo> = sess.query(QueryKind::Devices, None).await?;
    let device = match device {
        Some(d) => d,
        None => {
            if devices.is_empty() {
                bail!("no devices are registered on this relay (warren-relay device add ID)");
            }
            devices.sort_by_key(|d| (!d.online, d.device.to_string()));
            eprintln!("Devices:");
            for (i, d) in devices.iter().enumerate() {
                eprintln!(
                    "  {:>2}) {:<16} {:<8} {:<6} {}",
                    i + 1,
                    d.device,
                    if d.online { "online" } else { "offline" },
                    encode_enum(&d.health),
                    d.targets
                        .iter()
                        .map(|t| t.name.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let n = devices.len();
            let k = ask(sess, move || choose(&format!("device [1-{n}]: "), n, None)).await?;
            devices[k].device.clone()
        }
    };
    if target.is_some() {
        return Ok((device, target));
    }
    let Some(info) = devices.iter().find(|d| d.device == device) else {
        return Ok((device, None));
    };
    match info.targets.len() {
        0 => Ok((device, None)),
        1 => Ok((device, Some(info.targets[0].name.clone()))),
        n => {
            eprintln!("Destinations on {device}:");
            for (i, t) in info.targets.iter().enumerate() {
                let state = match t.health {
                    Some(TargetHealth::Up) => "up",
                    Some(TargetHealth::Down) => "down",
                    None => "?",
                };
                eprintln!("  {:>2}) {:<12} {:<24} {state}", i + 1, t.name, t.addr);
            }
            let k = ask(sess, move || choose(&format!("target [1-{n}]: "), n, None)).await?;
            Ok((device, Some(info.targets[k].name.clone())))
        }
    }
}
