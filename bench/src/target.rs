//! The one target every path leads to (run as `warren-bench target ADDR`, its own
//! process): the first byte of a connection picks the mode.
//!
//! - `E`: echo until the client closes.
//! - `U`: read until the client's half-close, then answer the byte count (u64, BE).
//! - `D`: read a u64 count, send that many bytes, close.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves forever.
pub async fn serve(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    loop {
        let (s, _) = l.accept().await?;
        tokio::spawn(async move {
            let _ = one(s).await;
        });
    }
}

async fn one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mode = s.read_u8().await?;
    match mode {
        b'E' => loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n]).await?;
        },
        b'U' => {
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_u64(total).await?;
            s.shutdown().await
        }
        b'D' => {
            let mut left = s.read_u64().await?;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.shutdown().await
        }
        _ => Ok(()),
    }
}
