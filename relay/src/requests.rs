//! Checking a tunnel request: every refusal carries a reason a person can act on.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use warren_bus::message::{Reason, TunnelRequest};
use warren_bus::TargetName;

use crate::tunnel::AllowFrom;

/// A refusal: the reason and a sentence saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Why, for programs.
    pub reason: Reason,
    /// Why, for people.
    pub detail: String,
}

impl Rejection {
    /// A refusal.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Parses `allow_from`: CIDRs or bare addresses; absent means "lock to the first".
pub fn parse_allow_from(list: Option<&[String]>) -> Result<AllowFrom, Rejection> {
    let Some(list) = list else {
        return Ok(AllowFrom::FirstAddress(None));
    };
    if list.is_empty() {
        return Err(Rejection::new(
            Reason::BadRequest,
            "allow_from is empty: nobody could connect; omit it to lock the tunnel to the first address that connects",
        ));
    }
    if list.len() > 64 {
        return Err(Rejection::new(
            Reason::BadRequest,
            "allow_from has more than 64 entries",
        ));
    }
    let mut nets = Vec::new();
    for s in list {
        let net = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                Rejection::new(
                    Reason::BadRequest,
                    format!(
                        "allow_from entry {:?} is not a CIDR such as 203.0.113.0/24 or an address",
                        trunc(s)
                    ),
                )
            })?;
        nets.push(net);
    }
    Ok(AllowFrom::Networks(nets))
}

/// The duration a request gets: its own, or the default; never over the maximum.
pub fn duration(
    req: &TunnelRequest,
    default: Duration,
    max: Duration,
) -> Result<Duration, Rejection> {
    let d = req.duration.map(|t| t.get()).unwrap_or(default);
    if d > max {
        return Err(Rejection::new(
            Reason::DurationTooLong,
            format!(
                "duration {} is longer than this relay's maximum of {}; ask for less",
                humantime::format_duration(d),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(d)
}

/// Checks `target` against the targets the agent announced.
pub fn target(
    req: &TunnelRequest,
    default: &TargetName,
    announced: &[TargetName],
) -> Result<TargetName, Rejection> {
    let t = req.target.clone().unwrap_or_else(|| default.clone());
    if !announced.contains(&t) {
        let names: Vec<&str> = announced.iter().map(|t| t.as_str()).collect();
        return Err(Rejection::new(
            Reason::UnknownTarget,
            format!(
                "device {} has no target {t}; it has: {}",
                req.device,
                names.join(", ")
            ),
        ));
    }
    Ok(t)
}

/// At most 80 characters of a user's string, for messages.
pub fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_from_takes_cidrs_and_addresses_and_refuses_garbage() {
        let ok = parse_allow_from(Some(&[
            "10.0.0.0/8".into(),
            "::1".into(),
            "203.0.113.7".into(),
        ]))
        .unwrap();
        assert!(matches!(ok, AllowFrom::Networks(n) if n.len() == 3));
        for bad in ["10.0.0.0/33", "banana", "10.0.0.1:22", "", "1.2.3.4/-1"] {
            let e = parse_allow_from(Some(&[bad.into()])).unwrap_err();
            assert_eq!(e.reason, Reason::BadRequest, "{bad}");
        }
        assert!(parse_allow_from(Some(&[])).is_err());
        assert!(matches!(
            parse_allow_from(None).unwrap(),
            AllowFrom::FirstAddress(None)
        ));
    }
}
