//! NAT traversal with real `gaia` processes in network namespaces the test builds itself.
//!
//! ```text
//!                       inet (a bridge: "the internet", 7.77.0.0/24)
//!             ┌──────────────────┼──────────────────┐
//!      public member P      router r1 (.2)      router r2 (.3)
//!      7.77.0.1, gateway   masquerade           masquerade
//!                              │                 │          │
//!                        A 192.168.71.2    B 192.168.72.2  D 192.168.73.2
//!                                                          (hole punching off)
//! ```
//!
//! A, B and D serve the model behind NAT routers that masquerade (nftables) and forward
//! nothing inwards; P is the only public member and the only bootstrap address. The test
//! asserts that P finds itself public and A, B, D do not (AutoNAT), that A, B and D hold a
//! relay slot on P (so their adverts carry the relayed address), and that A's requests are served by B
//! and by D (NAT to NAT: D only over the relay, B over whatever hole punching gave), and P's
//! by all three. It prints whether hole punching upgraded A↔B and the time to first token over
//! each path.
//!
//! Needs root (network namespaces), `ip` (iproute2) and `nft` (nftables): tests/run installs
//! them. Skipped, with a message saying why, when any is missing.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use gaia_tests::{Node, join_args, link_models, models_dir, open_domain, routable};

/// Heartbeat of the test domain.
const HEARTBEAT_MS: &str = "1000";

/// A home router: masquerade what leaves by the WAN side; let nothing in unless conntrack
/// knows it (a reply, or a punched hole), and drop the rest silently.
const NAT_RULES: &str = "\
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"wan\" masquerade
    }
}
table ip filter {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname \"wan\" ct state new drop
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname != \"wan\" accept
    }
}
";

/// The namespaces of one topology, deleted (with their links) on drop.
struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

impl Net {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn add(&mut self, name: &str) {
        let ns = self.ns(name);
        run("ip", &["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
    }

    /// A veth pair from `a` (interface `a_if`, address `a_ip`) to `b`.
    fn link(&self, a: &str, a_if: &str, a_ip: &str, b: &str, b_if: &str, b_ip: Option<&str>) {
        let (na, nb) = (self.ns(a), self.ns(b));
        run(
            "ip",
            &[
                "-n", &na, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &nb,
            ],
        );
        run("ip", &["-n", &na, "addr", "add", a_ip, "dev", a_if]);
        run("ip", &["-n", &na, "link", "set", a_if, "up"]);
        if let Some(ip) = b_ip {
            run("ip", &["-n", &nb, "addr", "add", ip, "dev", b_if]);
        }
        run("ip", &["-n", &nb, "link", "set", b_if, "up"]);
    }

    fn exec(&self, name: &str, args: &[&str]) {
        let ns = self.ns(name);
        let mut all = vec!["netns", "exec", &ns];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// The topology of the module's diagram.
    /// No namespaces yet; theirs will be named `gaia<pid><tag>-<name>`.
    fn empty(tag: &str) -> Net {
        Net {
            prefix: format!("gaia{}{tag}", std::process::id() % 100_000),
            namespaces: Vec::new(),
        }
    }

    fn build() -> Net {
        let mut net = Net::empty("");
        for name in ["inet", "p", "r1", "r2", "a", "b", "d"] {
            net.add(name);
        }
        let inet = net.ns("inet");
        run("ip", &["-n", &inet, "link", "add", "sw0", "type", "bridge"]);
        run("ip", &["-n", &inet, "link", "set", "sw0", "up"]);
        for (name, ifname, ip) in [
            ("p", "eth0", "7.77.0.1/24"),
            ("r1", "wan", "7.77.0.2/24"),
            ("r2", "wan", "7.77.0.3/24"),
        ] {
            let port = format!("to-{name}");
            net.link(name, ifname, ip, "inet", &port, None);
            run("ip", &["-n", &inet, "link", "set", &port, "master", "sw0"]);
        }
        net.link(
            "r1",
            "lan",
            "192.168.71.1/24",
            "a",
            "eth0",
            Some("192.168.71.2/24"),
        );
        net.link(
            "r2",
            "lan",
            "192.168.72.1/24",
            "b",
            "eth0",
            Some("192.168.72.2/24"),
        );
        net.link(
            "r2",
            "lan2",
            "192.168.73.1/24",
            "d",
            "eth0",
            Some("192.168.73.2/24"),
        );
        for (host, router) in [
            ("a", "192.168.71.1"),
            ("b", "192.168.72.1"),
            ("d", "192.168.73.1"),
        ] {
            run(
                "ip",
                &[
                    "-n",
                    &net.ns(host),
                    "route",
                    "add",
                    "default",
                    "via",
                    router,
                ],
            );
        }
        // Each router forwards and masquerades what leaves by its WAN side; nothing comes in
        // unless conntrack knows it (a reply, or a punched hole).
        let rules = tempfile::NamedTempFile::new().expect("a file for the nftables rules");
        std::fs::write(rules.path(), NAT_RULES).expect("the rules are written");
        let rules = rules.path().to_string_lossy().to_string();
        for router in ["r1", "r2"] {
            net.exec(router, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
            net.exec(router, &["nft", "-f", &rules]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need root".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (tests/run installs iproute2 and nftables)"
            ));
        }
    }
    // A container without CAP_NET_ADMIN cannot make namespaces even as root.
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let probe = format!(
        "gaia-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .is_ok_and(|o| o.status.success());
    if !made {
        return Some("cannot create a network namespace (`ip netns add` failed)".into());
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    None
}

/// Runs `f` on a thread inside the network namespace `ns` (so its sockets are there).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the thread in the namespace")
    })
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("an HTTP client")
}

fn info(ns: &str, node: &Node) -> Value {
    in_netns(ns, || {
        client()
            .get(format!("{}/v1/info", node.url))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("GET /v1/info of {}: {e}", node.url))
    })
}

/// One streamed chat completion through `node`: who served it, and the time to first token.
fn ask(ns: &str, node: &Node, i: usize) -> (String, Duration) {
    in_netns(ns, || {
        let body = json!({
            "model": "default",
            "messages": [{"role": "user", "content": format!("Say {i}.")}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": true,
        });
        let started = Instant::now();
        let (mut response, served) =
            crate::post_chat(&client(), &node.url, &body, &format!("request {i}"));
        // The first chunk that carries content marks the first token.
        let mut raw = Vec::new();
        let mut first = None;
        let mut buf = [0u8; 4096];
        loop {
            let n = std::io::Read::read(&mut response, &mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if first.is_none() && String::from_utf8_lossy(&raw).contains("\"content\"") {
                first = Some(started.elapsed());
            }
        }
        let raw = String::from_utf8_lossy(&raw).to_string();
        assert!(
            raw.contains("[DONE]"),
            "request {i}: unfinished stream: {raw}"
        );
        (served, first.unwrap_or_else(|| started.elapsed()))
    })
}

fn address_of(ns: &str, node: &Node) -> String {
    info(ns, node)["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in /v1/info of {}", node.url))
        .to_string()
}

/// Polls `check` on `/v1/info` of `node` until it holds (120 s at most: on a loaded 2-core
/// machine relay reservations and hole punching can take a minute).
fn wait_info(ns: &str, node: &Node, what: &str, check: impl Fn(&Value) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let value = info(ns, node);
        if check(&value) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: /v1/info swarm is {}\nstderr:\n{}",
            value["swarm"],
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends requests through `node` until each of `targets` has served one; the time to first
/// token of the first request each served.
fn reach_each(ns: &str, node: &Node, targets: &[&str]) -> Vec<Duration> {
    let mut found: Vec<Option<Duration>> = vec![None; targets.len()];
    for i in 0..40 {
        let (served, ttft) = ask(ns, node, i);
        if let Some(k) = targets.iter().position(|t| *t == served)
            && found[k].is_none()
        {
            found[k] = Some(ttft);
        }
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
    }
    panic!(
        "40 requests through {} did not reach every one of {targets:?}: {found:?}\n{}",
        node.url,
        node.stderr()
    );
}

#[test]
fn nodes_behind_nat_join_through_a_public_member_and_serve_each_other() {
    if let Some(why) = missing_prerequisite() {
        eprintln!(
            "SKIPPED nodes_behind_nat_join_through_a_public_member_and_serve_each_other: {why}"
        );
        return;
    }
    let models = models_dir();
    let net = Net::build();
    let env = [("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS)];

    // An open domain; P is its public member and bootstrap, a gateway.
    let (operator, _shared, manifest) = open_domain("nat");

    let p_ns = net.ns("p");
    let public = Node::launch_in(
        Some(&p_ns),
        operator,
        &["--gateway", "--domain", &manifest, "--p2p-port", "0"],
        &env,
    );
    let boot = public
        .p2p
        .iter()
        .find(|a| a.starts_with("/ip4/7.77.0.1/tcp/"))
        .cloned()
        .unwrap_or_else(|| panic!("P printed no 7.77.0.1 address: {:?}", public.p2p));
    let natted = |name: &str, extra: &[(&str, &str)]| {
        let dir = tempfile::tempdir().expect("a data directory");
        link_models(&models, dir.path());
        let mut all = env.to_vec();
        all.extend_from_slice(extra);
        Node::launch_in(Some(&net.ns(name)), dir, &join_args(&manifest, &boot), &all)
    };
    let a = natted("a", &[]);
    let b = natted("b", &[]);
    let d = natted("d", &[("GAIA_SWARM_HOLE_PUNCHING", "false")]);
    let (a_ns, b_ns, d_ns) = (net.ns("a"), net.ns("b"), net.ns("d"));
    let a_addr = address_of(&a_ns, &a);
    let b_addr = address_of(&b_ns, &b);
    let d_addr = address_of(&d_ns, &d);

    // AutoNAT: P public; the others not (private, or undecided while the routers drop the
    // dial-backs), each with a relay slot on P.
    let public_after = wait_info(&p_ns, &public, "P finds itself public", |v| {
        v["swarm"]["nat"] == json!("public")
    });
    let p_peer = info(&p_ns, &public)["swarm"]["peer_id"]
        .as_str()
        .expect("P's peer id")
        .to_string();
    let mut relayed_after = Vec::new();
    for (ns, node) in [(&a_ns, &a), (&b_ns, &b), (&d_ns, &d)] {
        relayed_after.push(wait_info(
            ns,
            node,
            "a private node holds a relay slot on P",
            |v| {
                v["swarm"]["nat"] == json!("private")
                    && v["swarm"]["relays"]
                        .as_array()
                        .is_some_and(|r| r.contains(&json!(p_peer)))
            },
        ));
    }
    // Every member routes to every serving node.
    let mut everyone = vec![a_addr.clone(), b_addr.clone(), d_addr.clone()];
    everyone.sort();
    let routable_after = wait_info(&p_ns, &public, "P routes to A, B and D", |v| {
        routable(v) == everyone
    });
    for (ns, node, own) in [
        (&a_ns, &a, &a_addr),
        (&b_ns, &b, &b_addr),
        (&d_ns, &d, &d_addr),
    ] {
        let others: Vec<String> = everyone.iter().filter(|n| *n != own).cloned().collect();
        wait_info(ns, node, "a NATed member routes to the other two", |v| {
            others.iter().all(|o| routable(v).contains(o))
        });
    }

    // NAT to NAT: A's requests are served by B (direct if punched) and by D (relay only).
    let ttft = reach_each(&a_ns, &a, &[&b_addr, &d_addr]);
    let (to_b, to_d) = (ttft[0], ttft[1]);
    let local = reach_each(&a_ns, &a, &[&a_addr])[0];
    // And the public gateway reaches all three.
    reach_each(&p_ns, &public, &[&a_addr, &b_addr, &d_addr]);
    // D's requests are served by A (D has hole punching off: relay both ways).
    reach_each(&d_ns, &d, &[&a_addr]);

    let punches = |ns: &str, node: &Node| {
        let v = info(ns, node);
        (
            v["swarm"]["hole_punches"].as_u64().unwrap_or(0),
            v["swarm"]["hole_punch_failures"].as_u64().unwrap_or(0),
        )
    };
    let (a_ok, a_failed) = punches(&a_ns, &a);
    let (b_ok, b_failed) = punches(&b_ns, &b);
    let (d_ok, _) = punches(&d_ns, &d);
    // P stayed public: its members' dial-backs were never refused (each used to leave a
    // connection open until the per-peer limit refused the next, and P flipped to private and
    // stopped relaying), and it relays for all three.
    let p_swarm = info(&p_ns, &public)["swarm"].clone();
    assert_eq!(
        (p_swarm["nat"].as_str(), p_swarm["nat_changes"].as_u64()),
        (Some("public"), Some(1)),
        "P's reachability changed after it was found public: {p_swarm}"
    );
    assert_eq!(p_swarm["relay_slots"].as_u64(), Some(3), "{p_swarm}");
    assert_eq!(
        d_ok, 0,
        "D has hole punching off yet reports a punched connection"
    );
    println!(
        "NAT figures: P public after {public_after:?}; relay slots after {relayed_after:?}; \
         P routes to all after {routable_after:?}; hole punches A {a_ok} ok / {a_failed} failed, \
         B {b_ok} ok / {b_failed} failed; time to first token from A: local {local:?}, \
         to B {to_b:?} ({}), to D over the relay {to_d:?}",
        if a_ok + b_ok > 0 {
            "direct after hole punching"
        } else {
            "relayed"
        }
    );
}

/// Two nodes on one LAN (two namespaces joined by a veth pair), started with `swarm.mdns` and
/// no bootstrap address at all: they find each other by mDNS and the gateway routes to the
/// serving node.
#[test]
fn nodes_on_one_lan_find_each_other_with_mdns() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIPPED nodes_on_one_lan_find_each_other_with_mdns: {why}");
        return;
    }
    let models = models_dir();
    let mut net = Net::empty("m");
    net.add("one");
    net.add("two");
    net.link(
        "one",
        "eth0",
        "10.88.0.1/24",
        "two",
        "eth0",
        Some("10.88.0.2/24"),
    );
    let env = [
        ("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS),
        ("GAIA_SWARM_MDNS", "true"),
    ];
    let (operator, _shared, manifest) = open_domain("lan");
    let (one_ns, two_ns) = (net.ns("one"), net.ns("two"));
    let dir = tempfile::tempdir().expect("a data directory");
    link_models(&models, dir.path());
    let serving = Node::launch_in(
        Some(&one_ns),
        dir,
        &["--domain", &manifest, "--p2p-port", "0"],
        &env,
    );
    let gateway = Node::launch_in(
        Some(&two_ns),
        operator,
        &["--gateway", "--domain", &manifest, "--p2p-port", "0"],
        &env,
    );
    let serving_addr = address_of(&one_ns, &serving);
    let found = wait_info(
        &two_ns,
        &gateway,
        "the gateway finds the serving node by mDNS",
        |v| routable(v) == [serving_addr.clone()],
    );
    let (served, _) = ask(&two_ns, &gateway, 0);
    assert_eq!(served, serving_addr);
    println!("mDNS: the gateway routed to the serving node {found:?} after both started");
}
