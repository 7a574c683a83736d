//! Warren behind a real NAT, on real network stacks (network namespaces):
//!
//! ```text
//!  operator 198.18.2.2 ──┐                      ┌── gw1 100.64.1.2 ── plc 203.0.113.2
//!                        ├── isp (router, NAT) ─┤      (LAN only reachable from gw1)
//!  relay    198.18.1.2 ──┘   MASQUERADE for     └── gw2 100.64.2.2
//!                            100.64.0.0/10, no way in
//! ```
//!
//! Needs root and `ip netns`; without them the test says SKIPPED, loudly, and passes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren_tests::*;

/// A set of namespaces and links, removed on drop.
struct Net {
    tag: String,
    namespaces: Vec<String>,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.tag)
    }

    fn exec(&self, ns: &str, args: &[&str]) {
        let n = self.ns(ns);
        let mut all = vec!["ip", "netns", "exec", n.as_str()];
        all.extend_from_slice(args);
        sh(&all);
    }

    fn add_ns(&mut self, name: &str) {
        let n = self.ns(name);
        sh(&["ip", "netns", "add", &n]);
        self.namespaces.push(n);
        self.exec(name, &["ip", "link", "set", "lo", "up"]);
    }

    /// A point-to-point link: `a` gets `a_addr`, `b` gets `b_addr` (CIDR).
    fn link(&self, a: &str, a_addr: &str, b: &str, b_addr: &str) -> (String, String) {
        let (ia, ib) = (format!("{}{a}{b}", self.tag), format!("{}{b}{a}", self.tag));
        let (ia, ib) = (short(&ia), short(&ib));
        sh(&[
            "ip", "link", "add", &ia, "type", "veth", "peer", "name", &ib,
        ]);
        sh(&["ip", "link", "set", &ia, "netns", &self.ns(a)]);
        sh(&["ip", "link", "set", &ib, "netns", &self.ns(b)]);
        self.exec(a, &["ip", "addr", "add", a_addr, "dev", &ia]);
        self.exec(b, &["ip", "addr", "add", b_addr, "dev", &ib]);
        self.exec(a, &["ip", "link", "set", &ia, "up"]);
        self.exec(b, &["ip", "link", "set", &ib, "up"]);
        (ia, ib)
    }
}

/// Interface names are at most 15 bytes.
fn short(s: &str) -> String {
    s.chars().take(15).collect()
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// A process started inside a namespace, killed on drop.
fn spawn_in(net: &Net, ns: &str, name: &str, args: &[&str], log: std::path::PathBuf) -> Proc {
    let n = net.ns(ns);
    let mut all = vec!["netns", "exec", n.as_str()];
    all.extend_from_slice(args);
    Proc::spawn(
        name,
        std::path::Path::new("/usr/sbin/ip"),
        &all,
        log,
        &std::env::temp_dir(),
    )
}

/// Runs `f` on a thread that lives in namespace `ns`: its sockets are that host's.
fn in_ns<T: Send + 'static>(net: &Net, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{}", net.ns(ns));
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Whether a TCP connection to `addr` from `ns` gets an echo back within 2 s.
fn reaches(net: &Net, ns: &str, addr: &str) -> bool {
    let addr = addr.to_owned();
    in_ns(net, ns, move || {
        let Ok(sa) = addr.parse() else { return false };
        let Ok(mut s) = TcpStream::connect_timeout(&sa, Duration::from_secs(2)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let msg = b"across the NAT\n";
        if s.write_all(msg).is_err() {
            return false;
        }
        let mut back = [0u8; 15];
        s.read_exact(&mut back).is_ok() && &back == msg
    })
}

fn ctl_in(net: &Net, env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let n = net.ns("op");
    let out = Command::new("ip")
        .args(["netns", "exec", &n])
        .arg(bin("warrenctl"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("warrenctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    for tool in ["/usr/sbin/ip", "/usr/sbin/iptables"] {
        if !std::path::Path::new(tool).exists() {
            return Some(format!("{tool} is missing"));
        }
    }
    let probe = format!("wprobe{}", std::process::id() % 100_000);
    let ok = Command::new("ip").args(["netns", "add", &probe]).output();
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    match ok {
        Ok(o) if o.status.success() => None,
        _ => Some("cannot create network namespaces".into()),
    }
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < end,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reaches_devices_behind_a_carrier_grade_nat_and_nothing_else() {
    if let Some(why) = skip_reason() {
        eprintln!("\n*** SKIPPED the NAT test: {why} (CI runs it as root) ***\n");
        return;
    }
    let mut net = Net {
        tag: format!("w{}", std::process::id() % 10_000),
        namespaces: vec![],
    };
    for ns in ["isp", "rel", "op", "g1", "g2", "plc"] {
        net.add_ns(ns);
    }
    net.link("rel", "198.18.1.2/24", "isp", "198.18.1.1/24");
    net.link("op", "198.18.2.2/24", "isp", "198.18.2.1/24");
    let (_, isp_g1) = net.link("g1", "100.64.1.2/24", "isp", "100.64.1.1/24");
    net.link("g2", "100.64.2.2/24", "isp", "100.64.2.1/24");
    net.link("plc", "203.0.113.2/24", "g1", "203.0.113.1/24");
    net.exec(
        "rel",
        &["ip", "route", "add", "default", "via", "198.18.1.1"],
    );
    net.exec(
        "op",
        &["ip", "route", "add", "default", "via", "198.18.2.1"],
    );
    net.exec(
        "g1",
        &["ip", "route", "add", "default", "via", "100.64.1.1"],
    );
    net.exec(
        "g2",
        &["ip", "route", "add", "default", "via", "100.64.2.1"],
    );
    // The ISP routes and masquerades the CGNAT segment; nothing from outside gets in.
    net.exec("isp", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    net.exec(
        "isp",
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "100.64.0.0/10",
            "-d",
            "198.18.0.0/15",
            "-j",
            "MASQUERADE",
        ],
    );
    net.exec(
        "isp",
        &[
            "iptables",
            "-A",
            "FORWARD",
            "-d",
            "100.64.0.0/10",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ],
    );
    // gw1 does not route: its LAN is reachable only from gw1 itself.
    net.exec("g1", &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);

    let dir = TempDir::new("nat");
    let data = dir.0.join("data");
    let echo = bin("warren-echo");
    let echo = echo.to_str().unwrap();
    let _svc1 = spawn_in(
        &net,
        "g1",
        "echo-g1",
        &[echo, "0.0.0.0:7000"],
        dir.0.join("svc1.log"),
    );
    let _plc = spawn_in(
        &net,
        "plc",
        "echo-plc",
        &[echo, "203.0.113.2:502"],
        dir.0.join("plc.log"),
    );
    let _svc2 = spawn_in(
        &net,
        "g2",
        "echo-g2",
        &[echo, "0.0.0.0:7000"],
        dir.0.join("svc2.log"),
    );
    std::thread::sleep(Duration::from_millis(300));

    // 1. Without Warren, the operator reaches neither gateway nor the PLC.
    assert!(
        reaches(&net, "g1", "203.0.113.2:502"),
        "the PLC serves its LAN"
    );
    assert!(reaches(&net, "g1", "100.64.1.2:7000"), "gw1's service runs");
    for target in ["100.64.1.2:7000", "100.64.2.2:7000", "203.0.113.2:502"] {
        assert!(
            !reaches(&net, "op", target),
            "the operator reached {target} directly"
        );
    }

    // The relay on the internet side, serving the network with credentials required.
    let (lo, hi) = port_range(30);
    let relay_cfg = dir.0.join("relay.toml");
    write_file(
        &relay_cfg,
        &format!(
            "data_dir = \"{}\"\npublic_host = \"198.18.1.2\"\nbind = \"0.0.0.0\"\nport_range = \"{lo}-{hi}\"\n\
             [broker]\nlisten = \"0.0.0.0:1883\"\n[tunnels]\nclosed_retention = \"2s\"\n[liveness]\nheartbeat = \"1s\"\n",
            data.display()
        ),
    );
    let relay_bin = bin("warren-relay");
    let relay_bin = relay_bin.to_str().unwrap();
    let cfg_s = relay_cfg.to_str().unwrap();
    let relay = spawn_in(
        &net,
        "rel",
        "warren-relay",
        &[relay_bin, "--config", cfg_s],
        dir.0.join("relay.log"),
    );
    wait_for_log(&relay, "relay ready").await;
    let admin = |args: &[&str]| {
        let out = Command::new(relay_bin)
            .args(["--config", cfg_s])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let agent_cfg = |id: &str, targets: &[&str]| {
        let mut args = vec!["device", "add", id];
        for t in targets {
            args.push("--target");
            args.push(t);
        }
        let toml = admin(&args).replacen(
            "prefix = ",
            "heartbeat = \"1s\"\nkeep_alive = \"5s\"\nprobe_interval = \"1s\"\nprefix = ",
            1,
        );
        let p = dir.0.join(format!("{id}.toml"));
        write_file(&p, &toml);
        p
    };
    let g1_cfg = agent_cfg("gw1", &["svc=127.0.0.1:7000", "plc=203.0.113.2:502"]);
    let g2_cfg = agent_cfg("gw2", &["svc=127.0.0.1:7000"]);
    assert!(std::fs::read_to_string(&g1_cfg)
        .unwrap()
        .contains("mqtts://198.18.1.2:1883"));
    let agent_bin = bin("warren-agent");
    let agent_bin = agent_bin.to_str().unwrap();
    let _a1 = spawn_in(
        &net,
        "g1",
        "agent-gw1",
        &[agent_bin, "--config", g1_cfg.to_str().unwrap()],
        dir.0.join("gw1.log"),
    );
    let _a2 = spawn_in(
        &net,
        "g2",
        "agent-gw2",
        &[agent_bin, "--config", g2_cfg.to_str().unwrap()],
        dir.0.join("gw2.log"),
    );

    // The operator has an account and talks to the relay across the internet segment.
    let creds = admin(&["user", "add", "ops"]);
    let env: Vec<(String, String)> = creds
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("WARREN_"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // Off loopback the bus is TLS: user add printed the mqtts:// URL and the fingerprint.
    assert!(
        env.contains(&("WARREN_BROKER".into(), "mqtts://198.18.1.2:1883".into())),
        "{env:?}"
    );
    wait_until("both gateways online", Duration::from_secs(20), || {
        let (_, out, _) = ctl_in(&net, &env, &["devices"]);
        out.lines().filter(|l| l.contains(" online ")).count() == 2
    })
    .await;

    // 2. One command gives the operator the gateway's service, and the PLC behind it.
    let open = |target: &str, id: &str, dur: &str| {
        let (code, out, err) = ctl_in(
            &net,
            &env,
            &["open", "gw1", "--target", target, "--for", dur, "--id", id],
        );
        assert_eq!(code, 0, "open {target}: {out}{err}");
        out.lines()
            .find_map(|l| l.strip_prefix("address"))
            .map(|a| a.trim().to_owned())
            .expect("an address")
    };
    let svc = open("svc", "n1", "5m");
    assert!(svc.starts_with("198.18.1.2:"), "{svc}");
    assert!(
        reaches(&net, "op", &svc),
        "the operator cannot use the tunnel to gw1's service"
    );
    let plc = open("plc", "n2", "5m");
    assert!(
        reaches(&net, "op", &plc),
        "the operator cannot reach the PLC through gw1"
    );
    let (_, out, _) = ctl_in(
        &net,
        &env,
        &["open", "gw2", "--target", "svc", "--id", "n3"],
    );
    let g2 = out
        .lines()
        .find_map(|l| l.strip_prefix("address"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(reaches(&net, "op", &g2), "gw2's service through its tunnel");

    // 3. After close, and after expiry, nothing is reachable.
    let (code, _, err) = ctl_in(&net, &env, &["close", "n1"]);
    assert_eq!(code, 0, "{err}");
    assert!(!reaches(&net, "op", &svc), "still reachable after close");
    let short_lived = open("plc", "n4", "3s");
    assert!(reaches(&net, "op", &short_lived));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !reaches(&net, "op", &short_lived),
        "still reachable after expiry"
    );
    for target in ["100.64.1.2:7000", "203.0.113.2:502"] {
        assert!(
            !reaches(&net, "op", target),
            "{target} became directly reachable"
        );
    }

    // 4. Cut gw1's uplink longer than its keep-alive: the relay calls it lost. Restore
    //    it: the agent comes back by itself and serves a new tunnel.
    let watch = Command::new("ip")
        .args(["netns", "exec", &net.ns("op")])
        .arg(bin("warrenctl"))
        .args(["watch", "gw1", "--json"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(dir.0.join("watch.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _watch = KillOnDrop(watch);
    tokio::time::sleep(Duration::from_millis(500)).await;
    net.exec("isp", &["ip", "link", "set", &isp_g1, "down"]);
    let watch_log = dir.0.join("watch.log");
    wait_until("device_lost for gw1", Duration::from_secs(30), || {
        std::fs::read_to_string(&watch_log)
            .unwrap_or_default()
            .contains("device_lost")
    })
    .await;
    net.exec("isp", &["ip", "link", "set", &isp_g1, "up"]);
    wait_until("device_back for gw1", Duration::from_secs(60), || {
        std::fs::read_to_string(&watch_log)
            .unwrap_or_default()
            .contains("device_back")
    })
    .await;
    let again = open("svc", "n5", "1m");
    assert!(
        reaches(&net, "op", &again),
        "no new tunnel after the uplink came back"
    );
    drop(relay);
}
