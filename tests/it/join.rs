//! Joining with nothing: real `gaia` processes on loopback. A new member starts on a data
//! directory holding only its key, with the domain's manifest and its certificate, and fetches
//! the chat model, the knowledge base and that base's embedding model from the two members
//! that seed them (`/gaia/content/1.0.0`), one of which is killed midway; then it serves a
//! request routed to it. A seeder whose model file rots on disk after it described it sends a
//! bad chunk: it is caught and avoided, and an interrupted `gaia models pull --from-domain`
//! resumes under `gaia start`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{client, info, init_address};
use gaia_tests::{
    CHAT_MODEL, EMBEDDING_MODEL, Node, gaia, gaia_bin, join_args, link_models, models_dir,
    open_domain, text,
};
use serde_json::{Value, json};

const HEARTBEAT_MS: &str = "1000";
/// Each seeder's upload limit: slow enough that a fetch lasts seconds, so a seeder can be
/// killed in the middle of it.
const UPLOAD_BYTES_PER_S: &str = "20000000";

/// The peer id at the end of a `/p2p/` multiaddr.
fn peer_of(addr: &str) -> String {
    addr.rsplit('/').next().unwrap_or_default().to_string()
}

/// Polls `log` until a line has `needle` in it; panics after `secs`.
fn wait_for_line(log: &Path, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needle:?} in {} within {secs} s:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The highest percentage of the `gaia: fetching <what> NAME (SIZE): N% (...)` lines in `log`.
fn progress(log: &Path, what: &str) -> u32 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(&format!("fetching {what} ")))
        .filter_map(|l| l.rsplit_once(": ")?.1.split_once('%'))
        .filter_map(|(n, _)| n.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Sends chats through `entry` until one is served by `node` (its address).
fn routed_to(client: &reqwest::blocking::Client, entry: &Node, node: &str) -> bool {
    for i in 0..24 {
        let response = client
            .post(format!("{}/v1/chat/completions", entry.url))
            .json(&json!({
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": format!("Say hello {i}")}],
                "max_tokens": 4,
                "temperature": 0,
            }))
            .send()
            .expect("a chat through the entry node");
        assert!(response.status().is_success(), "{:?}", response.text());
        let served = response
            .headers()
            .get("x-gaia-node")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_lowercase();
        if served == node.to_lowercase() {
            return true;
        }
    }
    false
}

/// Waits until `entry` routes to `node`.
fn wait_routable(client: &reqwest::blocking::Client, entry: &Node, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let table = gaia_tests::routable(&info(client, entry));
        if table.iter().any(|n| n.eq_ignore_ascii_case(node)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} never became routable at {}: {table:?}\n{}",
            entry.url,
            entry.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Puts `model` of the test store into `data_dir`'s store: copies of its files, or links.
fn store_model(models: &Path, data_dir: &Path, model: &str, copy: bool) {
    let dir = data_dir.join("models").join(model);
    std::fs::create_dir_all(&dir).expect("a model directory");
    for entry in std::fs::read_dir(models.join(model)).expect("the test store") {
        let entry = entry.expect("a directory entry");
        let to = dir.join(entry.file_name());
        if copy {
            std::fs::copy(entry.path(), to).expect("a copy of the model file");
        } else {
            std::os::unix::fs::symlink(entry.path(), to).expect("a link to the model file");
        }
    }
}

const GUIDE: &str = "# Harbour guide\n\nThe ferry to Skerry Island leaves the north quay at \
                     seven every morning. Tickets are sold on board, cash only.\n\n## Tides\n\n\
                     At spring tides the south slipway floods; boats use the north quay.\n";

#[test]
fn a_node_with_nothing_fetches_model_and_knowledge_from_its_peers_and_serves() {
    let models = models_dir();
    let client = client();
    // Two seeders with the same knowledge base (one document), admitted to an allow-list
    // domain that requires that base, and a third node holding nothing but its key.
    let a_dir = tempfile::tempdir().expect("a data directory");
    let b_dir = tempfile::tempdir().expect("a data directory");
    let c_dir = tempfile::tempdir().expect("a data directory");
    let addresses: Vec<String> = [&a_dir, &b_dir, &c_dir]
        .iter()
        .map(|d| init_address(d.path()))
        .collect();
    link_models(&models, a_dir.path());
    link_models(&models, b_dir.path());
    let guide = a_dir.path().join("harbour-guide.md");
    std::fs::write(&guide, GUIDE).expect("the document");
    for dir in [&a_dir, &b_dir] {
        let out = gaia(
            dir.path(),
            &[
                "kb",
                "ingest",
                &guide.to_string_lossy(),
                "--root",
                &a_dir.path().to_string_lossy(),
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    let kb_hash = |dir: &Path| {
        let out = gaia(dir, &["kb", "info", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let kb: Value = serde_json::from_slice(&out.stdout).expect("kb info is JSON");
        kb["hash"].as_str().expect("a kb hash").to_string()
    };
    let kb_hash_a = kb_hash(a_dir.path());
    assert_eq!(kb_hash_a, kb_hash(b_dir.path()), "one document, one hash");
    let kb_hash = kb_hash_a;

    let operator = tempfile::tempdir().expect("a data directory");
    init_address(operator.path());
    let out = gaia(
        operator.path(),
        &["domain", "create", "harbour", "--kb-hash", &kb_hash],
    );
    assert!(out.status.success(), "{}", text(&out));
    for address in &addresses {
        let out = gaia(
            operator.path(),
            &["domain", "admit", address, "--domain", "harbour"],
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    let domain = operator.path().join("domains/harbour");
    let manifest = domain.join("manifest.bin").to_string_lossy().to_string();
    let env = [
        ("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS),
        ("GAIA_CONTENT_UPLOAD_BYTES_PER_S", UPLOAD_BYTES_PER_S),
    ];
    // Each finds its certificate next to the manifest (certs/<address>.bin).
    let member = |dir: tempfile::TempDir, bootstrap: Option<&str>| {
        let mut args = vec!["--domain", &manifest, "--p2p-port", "0"];
        if let Some(boot) = bootstrap {
            args.extend(["--bootstrap", boot]);
        }
        Node::launch(dir, &args, &env)
    };
    let mut a = member(a_dir, None);
    let boot = a.loopback_p2p();
    let b = member(b_dir, Some(&boot));
    for seeder in [&a, &b] {
        let log = seeder.data_dir().join("gaia-stderr.log");
        wait_for_line(&log, "seeding knowledge base", 120);
    }
    let a_peer = peer_of(&boot);
    let b_peer = peer_of(&b.loopback_p2p());

    // The new node's log is known before it starts: kill A once a fifth of the chat model is in.
    let c_log = c_dir.path().join("gaia-stderr.log");
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(240);
        while progress(&c_log, "chat model") < 20 {
            assert!(Instant::now() < deadline, "the fetch never reached 20 %");
            std::thread::sleep(Duration::from_millis(10));
        }
        let at = progress(&c_log, "chat model");
        a.kill();
        (a, at)
    });
    let started = Instant::now();
    let c = member(c_dir, Some(&b.loopback_p2p()));
    let to_serving = started.elapsed();
    let (_a, killed_at) = killer.join().expect("the killer thread");
    let log = c.stderr();
    eprintln!("time from gaia start to serving: {to_serving:?}; A killed at {killed_at} %\n{log}");
    assert!(
        killed_at < 100,
        "A was killed after the chat model was in:\n{log}"
    );

    // What it fetched, from whom: the chat model from both (A until it died), the rest from B.
    let fetched_chat = log
        .lines()
        .find(|l| l.contains("fetched chat model"))
        .unwrap_or_else(|| panic!("no chat model fetched:\n{log}"));
    assert!(
        fetched_chat.contains(&a_peer) && fetched_chat.contains(&b_peer),
        "the chat model came from both seeders: {fetched_chat}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("seeder {a_peer} dropped"))),
        "A's death is noticed:\n{log}"
    );
    assert!(log.contains("fetched knowledge base kb"), "{log}");
    assert!(log.contains("fetched embedding model"), "{log}");
    assert!(
        log.contains("imported the domain's knowledge base"),
        "{log}"
    );

    // It serves the domain's content: the accepted model and the required knowledge base.
    let c_info = info(&client, &c);
    let a_model = models.join(CHAT_MODEL).join("gaia-model.json");
    let pinned: Value =
        serde_json::from_slice(&std::fs::read(a_model).expect("the model manifest")).unwrap();
    assert_eq!(
        c_info["models"]["chat"]["sha256"],
        pinned["files"][0]["sha256"]
    );
    assert_eq!(c_info["models"]["chat"]["name"], CHAT_MODEL);
    assert_eq!(c_info["models"]["embedding"]["name"], EMBEDDING_MODEL);
    assert_eq!(
        c_info["knowledge_base"]["hash"],
        json!(kb_hash),
        "{c_info:#}"
    );
    // Its store holds real files, not links into the test store.
    let fetched_gguf = c
        .data_dir()
        .join("models")
        .join(CHAT_MODEL)
        .join(pinned["files"][0]["name"].as_str().unwrap());
    assert!(
        !std::fs::symlink_metadata(&fetched_gguf)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // And a request routed through B reaches it.
    wait_routable(&client, &b, &addresses[2]);
    assert!(
        routed_to(&client, &b, &addresses[2]),
        "no request through B was served by the new node"
    );
    // A restart needs nothing more.
    let c = member(c.stop_keep_data(), Some(&b.loopback_p2p()));
    assert!(!c.stderr().contains("fetching"), "{}", c.stderr());
}

#[test]
fn a_rotten_seeder_is_avoided_and_an_interrupted_pull_resumes() {
    let models = models_dir();
    let client = client();
    let (operator, _shared, manifest) = open_domain("rot");
    let env = [
        ("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS),
        ("GAIA_CONTENT_UPLOAD_BYTES_PER_S", UPLOAD_BYTES_PER_S),
        ("GAIA_KNOWLEDGE_DEMO", "false"),
    ];
    link_models(&models, operator.path());
    let a = Node::launch(operator, &["--domain", &manifest, "--p2p-port", "0"], &env);
    let boot = a.loopback_p2p();
    // B holds its own copy of the model files, which rot once it has described them.
    let b_dir = tempfile::tempdir().expect("a data directory");
    for model in [CHAT_MODEL, EMBEDDING_MODEL] {
        store_model(&models, b_dir.path(), model, true);
    }
    let b = Node::launch(b_dir, &join_args(&manifest, &boot), &env);
    wait_for_line(
        &b.data_dir().join("gaia-stderr.log"),
        "seeding chat model",
        120,
    );
    wait_for_line(
        &a.data_dir().join("gaia-stderr.log"),
        "seeding chat model",
        120,
    );
    let gguf = std::fs::read_dir(b.data_dir().join("models").join(CHAT_MODEL))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .expect("B's gguf");
    let mut bytes = std::fs::read(&gguf).unwrap();
    for chunk in bytes.chunks_mut(1 << 20) {
        chunk[512] ^= 0x5a;
    }
    std::fs::write(&gguf, &bytes).unwrap();
    let b_peer = peer_of(&b.loopback_p2p());

    // C has the embedding model (this domain requires no knowledge base, so nothing names
    // it) and nothing else. `gaia models pull --from-domain` is interrupted at 30 %.
    let c_dir = tempfile::tempdir().expect("a data directory");
    store_model(&models, c_dir.path(), EMBEDDING_MODEL, false);
    let pull_log = c_dir.path().join("pull.log");
    let mut pull = Command::new(gaia_bin())
        .arg("--data-dir")
        .arg(c_dir.path())
        .args(["--quiet", "models", "pull", "--from-domain", &manifest])
        .env("GAIA_SWARM_BOOTSTRAP", &boot)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&pull_log).unwrap())
        .spawn()
        .expect("gaia models pull runs");
    let deadline = Instant::now() + Duration::from_secs(180);
    while progress(&pull_log, "chat model") < 30 {
        assert!(
            Instant::now() < deadline && pull.try_wait().unwrap().is_none(),
            "the pull never reached 30 %:\n{}",
            std::fs::read_to_string(&pull_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    pull.kill().unwrap();
    pull.wait().unwrap();
    let pulled = std::fs::read_to_string(&pull_log).unwrap();
    assert!(
        pulled
            .lines()
            .any(|l| l.contains(&format!("seeder {b_peer} dropped"))
                && l.contains("does not match its digest")),
        "B's bad chunk is caught:\n{pulled}"
    );

    let c = Node::launch(c_dir, &join_args(&manifest, &boot), &env);
    let log = c.stderr();
    assert!(
        log.contains("resuming chat model"),
        "the fetch resumes:\n{log}"
    );
    let fetched = log
        .lines()
        .find(|l| l.contains("fetched chat model"))
        .unwrap_or_else(|| panic!("no chat model fetched:\n{log}"));
    assert!(fetched.contains("resumed from an earlier try"), "{fetched}");
    let dropped = log
        .lines()
        .find(|l| l.contains(&format!("seeder {b_peer} dropped")))
        .unwrap_or_else(|| panic!("B is dropped:\n{log}"));
    assert!(dropped.contains("does not match its digest"), "{dropped}");
    let c_info = info(&client, &c);
    let pinned: Value = serde_json::from_slice(
        &std::fs::read(models.join(CHAT_MODEL).join("gaia-model.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        c_info["models"]["chat"]["sha256"],
        pinned["files"][0]["sha256"]
    );
    // It serves: a chat through A can reach it.
    let c_address = c_info["address"].as_str().expect("an address").to_string();
    wait_routable(&client, &a, &c_address);
    assert!(
        routed_to(&client, &a, &c_address),
        "no request through A reached C"
    );
}
