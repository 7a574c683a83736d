//! Target probes: a TCP connect to each target, every `probe_interval`.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::net::TcpStream;
use warren_bus::message::TargetHealth;
use warren_bus::TargetName;

use crate::config::Target;

/// Probes every target concurrently; each gets `deadline`.
pub async fn probe_all(
    targets: &[Target],
    deadline: Duration,
) -> BTreeMap<TargetName, TargetHealth> {
    let mut set = tokio::task::JoinSet::new();
    for t in targets.iter().cloned() {
        set.spawn(async move {
            let up = matches!(
                tokio::time::timeout(deadline, TcpStream::connect(&t.addr)).await,
                Ok(Ok(_))
            );
            (
                t.name,
                if up {
                    TargetHealth::Up
                } else {
                    TargetHealth::Down
                },
            )
        });
    }
    let mut out = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        if let Ok((name, health)) = joined {
            out.insert(name, health);
        }
    }
    out
}
