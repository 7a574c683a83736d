//! Where the bus is and who we are: `config/ctl.toml` defaults, then a config file, then
//! `WARREN_BROKER`/`WARREN_USER`/`WARREN_PASSWORD` and flags (clap merges those two).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use warren_bus::client::BrokerUrl;
use warren_bus::{Topics, Ttl};

/// The commented defaults, shipped as `config/ctl.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../config/ctl.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    broker: String,
    prefix: String,
    timeout: Ttl,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    relay_fingerprint: Option<String>,
    #[serde(default)]
    ca: Option<PathBuf>,
    ssh: String,
}

/// What the command line (flags or environment) said.
#[derive(Debug, Default, Clone)]
pub struct Given {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--broker` / `WARREN_BROKER`.
    pub broker: Option<String>,
    /// `--user` / `WARREN_USER`.
    pub user: Option<String>,
    /// `--password` / `WARREN_PASSWORD`.
    pub password: Option<String>,
    /// `--prefix`.
    pub prefix: Option<String>,
    /// `--timeout`.
    pub timeout: Option<Ttl>,
    /// `--relay-fingerprint` / `WARREN_RELAY_FINGERPRINT`.
    pub relay_fingerprint: Option<String>,
    /// `--ca` / `WARREN_CA`.
    pub ca: Option<PathBuf>,
}

/// Everything warrenctl needs to talk to the bus.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker.
    pub broker: BrokerUrl,
    /// Operator login.
    pub credentials: Option<(String, String)>,
    /// Topics under the relay's prefix.
    pub topics: Topics,
    /// How long to wait for the broker and the relay.
    pub timeout: Duration,
    /// The ssh program.
    pub ssh: String,
    /// How the broker's certificate is checked, for `mqtts://`.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// `~/.config/warren/ctl.toml` (or under `$XDG_CONFIG_HOME`), when it exists.
fn user_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
    let f = base.join("warren").join("ctl.toml");
    f.exists().then_some(f)
}

impl Settings {
    /// Merges defaults, the file and what was given.
    pub fn load(given: &Given) -> anyhow::Result<Self> {
        let mut b = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = given.config.clone().or_else(user_file) {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            b = b.add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        let file: File = b
            .build()
            .and_then(|c| c.try_deserialize())
            .context("could not read warrenctl's configuration")?;
        let broker = given.broker.clone().unwrap_or(file.broker);
        let broker: BrokerUrl = broker
            .parse()
            .map_err(|e: String| anyhow::anyhow!("broker: {e}"))?;
        let user = given.user.clone().or(file.user);
        let password = given.password.clone().or(file.password);
        let credentials = match (user, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(u), None) => {
                bail!("user {u:?} has no password: set WARREN_PASSWORD or --password")
            }
            (None, Some(_)) => bail!("a password without a user: set WARREN_USER or --user"),
        };
        let fingerprint = given.relay_fingerprint.clone().or(file.relay_fingerprint);
        let ca = given.ca.clone().or(file.ca);
        let tls = match broker.tls {
            false => None,
            true if fingerprint.is_none() && ca.is_none() => bail!(
                "{broker} is MQTT over TLS: say which relay to trust with WARREN_RELAY_FINGERPRINT \
                 (printed by `warren-relay user add`) or WARREN_CA (a CA file)"
            ),
            true => Some(warren_bus::trust::client_config(
                fingerprint.as_deref(),
                ca.as_deref(),
            )?),
        };
        let prefix = given.prefix.clone().unwrap_or(file.prefix);
        let topics = Topics::new(&prefix).with_context(|| format!("prefix {prefix:?}"))?;
        Ok(Settings {
            broker,
            credentials,
            topics,
            timeout: given.timeout.unwrap_or(file.timeout).get(),
            ssh: file.ssh,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_file_parses() {
        let s = Settings::load(&Given {
            config: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../config/ctl.toml"
            ))),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.broker.port, 1883);
        assert_eq!(s.topics.prefix(), "warren");
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert!(s.credentials.is_none());
    }

    #[test]
    fn flags_win_and_half_credentials_are_refused() {
        let s = Settings::load(&Given {
            config: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../config/ctl.toml"
            ))),
            broker: Some("mqtt://10.0.0.1:2883".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((s.broker.host.as_str(), s.broker.port), ("10.0.0.1", 2883));
        let err = Settings::load(&Given {
            user: Some("ana".into()),
            config: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../config/ctl.toml"
            ))),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("WARREN_PASSWORD"), "{err}");
    }

    #[test]
    fn mqtts_needs_a_relay_to_trust() {
        let file = Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/ctl.toml"
        )));
        let given = Given {
            config: file,
            broker: Some("mqtts://relay.example".into()),
            ..Default::default()
        };
        let err = Settings::load(&given).unwrap_err();
        assert!(
            err.to_string().contains("WARREN_RELAY_FINGERPRINT"),
            "{err}"
        );
        let s = Settings::load(&Given {
            relay_fingerprint: Some("ab".repeat(32)),
            ..given
        })
        .unwrap();
        assert!(s.tls.is_some() && s.broker.tls && s.broker.port == 8883);
    }
}
