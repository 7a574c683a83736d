//! `warren-echo ADDR`: a TCP echo server for tests that need a target inside a network
//! namespace (`ip netns exec NS warren-echo 0.0.0.0:7000`). Runs until killed.

use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("warren-echo: could not listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("warren-echo: listening on {addr}");
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}
