//! `warrenctl`: the operator's terminal for Warren.
//!
//! - [`settings`]: where the bus is and who we are (file, then `WARREN_…`, then flags).
//! - [`session`]: one bus connection: queries, tunnel requests, following a tunnel's state.
//! - [`show`]: tables and one-line renderings for people.
//! - [`tunnel`]: `open`, `ssh`, `forward`, `close`, `extend`.
//! - [`picker`]: choosing a device, then a target, on a terminal (the patent's G1/G2).
//! - [`watch`]: the live stream of everything on the bus.

pub mod picker;
pub mod session;
pub mod settings;
pub mod show;
pub mod tunnel;
pub mod watch;

/// Why warrenctl failed, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The relay refused or ended the tunnel; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CtlError {
    /// 2 when the relay said no, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Refused(_) => 2,
            CtlError::Other(_) => 1,
        }
    }
}
