//! The notifier: runs the configured command with an alert as JSON on stdin — the "tell
//! the user by mail" step.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// Runs `cmd` in the background with `payload` on stdin, killed after `deadline`.
pub fn spawn(cmd: Vec<String>, payload: Vec<u8>, deadline: Duration) {
    tokio::spawn(async move {
        let Some((program, args)) = cmd.split_first() else {
            return;
        };
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return warn!(%program, error = %e, "could not start the notify command"),
        };
        let run = async {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(&payload).await?;
                stdin.write_all(b"\n").await?;
            }
            child.wait().await
        };
        match tokio::time::timeout(deadline, run).await {
            Ok(Ok(status)) if status.success() => info!(%program, "alert notified"),
            Ok(Ok(status)) => warn!(%program, %status, "notify command failed"),
            Ok(Err(e)) => warn!(%program, error = %e, "notify command failed"),
            Err(_) => warn!(%program, ?deadline, "notify command timed out; killed"),
        }
    });
}
