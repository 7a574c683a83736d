//! Port pairs: a tunnel's user port and agent port. A port is allocated exactly while its
//! listener lives, so the OS keeps the books and dropping a [`PortPair`] frees both.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use rand::Rng;
use tokio::net::TcpListener;

/// Two bound listeners, one per side of a tunnel.
#[derive(Debug)]
pub struct PortPair {
    /// Where operators connect.
    pub user: TcpListener,
    /// Where the agent's data connections arrive.
    pub agent: TcpListener,
}

impl PortPair {
    /// The user port.
    pub fn user_port(&self) -> u16 {
        self.user.local_addr().map(|a| a.port()).unwrap_or(0)
    }
    /// The agent port.
    pub fn agent_port(&self) -> u16 {
        self.agent.local_addr().map(|a| a.port()).unwrap_or(0)
    }
}

/// Why no pair could be had.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Every port tried is in use.
    #[error("every port of this relay's range is in use; close a tunnel or try again later")]
    Full,
    /// The process has no descriptors left (its `ulimit -n` / `LimitNOFILE`).
    #[error("the relay has run out of file descriptors ({0}); raise its limit (ulimit -n, systemd LimitNOFILE)")]
    OutOfDescriptors(std::io::Error),
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Binds two distinct random ports in `range`, trying at most `attempts` ports in all.
pub async fn allocate(
    bind: IpAddr,
    range: &RangeInclusive<u16>,
    attempts: u32,
) -> Result<PortPair, AllocError> {
    // Random ports, not sequential ones: nobody can guess the next tunnel's ports, and two
    // relays sharing a range rarely collide. A busy port is just another try, so a nearly
    // full range still finds the gaps with high probability; a full one gives up quickly.
    let mut first: Option<TcpListener> = None;
    for _ in 0..attempts {
        let port = rand::thread_rng().gen_range(range.clone());
        if first
            .as_ref()
            .is_some_and(|l| l.local_addr().is_ok_and(|a| a.port() == port))
        {
            continue;
        }
        let l = match bind_one(SocketAddr::new(bind, port)).await {
            Ok(l) => l,
            Err(e) if out_of_descriptors(&e) => return Err(AllocError::OutOfDescriptors(e)),
            Err(_) => continue,
        };
        match first.take() {
            None => first = Some(l),
            Some(user) => return Ok(PortPair { user, agent: l }),
        }
    }
    // Small ranges: fall back to a sweep so "full" really means full.
    if range.len() <= attempts as usize * 4 {
        for port in range.clone() {
            if first
                .as_ref()
                .is_some_and(|l| l.local_addr().is_ok_and(|a| a.port() == port))
            {
                continue;
            }
            match bind_one(SocketAddr::new(bind, port)).await {
                Ok(l) => match first.take() {
                    None => first = Some(l),
                    Some(user) => return Ok(PortPair { user, agent: l }),
                },
                Err(e) if out_of_descriptors(&e) => return Err(AllocError::OutOfDescriptors(e)),
                Err(_) => {}
            }
        }
    }
    Err(AllocError::Full)
}

async fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // SO_REUSEADDR lets a port with TIME_WAIT connections from an ended tunnel be reused
    // at once; on Linux it never lets two listeners share a port (that is SO_REUSEPORT).
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pair_is_two_distinct_ports_in_range_freed_on_drop() {
        let lo = 40000 + (std::process::id() % 2000) as u16 * 10;
        let range = lo..=lo + 3;
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = allocate(ip, &range, 16).await.unwrap();
        assert_ne!(a.user_port(), a.agent_port());
        assert!(range.contains(&a.user_port()) && range.contains(&a.agent_port()));
        let b = allocate(ip, &range, 16).await.unwrap();
        assert!(
            matches!(allocate(ip, &range, 16).await, Err(AllocError::Full)),
            "range of 4 holds 2 pairs"
        );
        drop(a);
        let c = allocate(ip, &range, 16).await.unwrap();
        drop((b, c));
    }
}
