//! Multi-node and multi-process scenarios: real `gaia` processes (the binary that
//! [`gaia_tests::gaia_bin`] finds) and real libp2p swarms.

mod cluster;
mod join;
mod nat;
mod pay;
mod swarm;
mod swarm_hardening;

/// Posts one chat completion to the node at `url`; panics (naming `what`) if it cannot be
/// sent or is not a success. Returns the response, to read or stream, and the node that
/// served it (its `x-gaia-node` header).
fn post_chat(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &serde_json::Value,
    what: &str,
) -> (reqwest::blocking::Response, String) {
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status();
    let node = response
        .headers()
        .get("x-gaia-node")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if !status.is_success() {
        let raw = response.text().unwrap_or_default();
        panic!("{what}: HTTP {status}: {raw}");
    }
    let node = node.unwrap_or_else(|| panic!("{what}: no x-gaia-node header"));
    (response, node)
}

/// An HTTP client with a timeout long enough for a chat on a busy machine.
fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(180))
        .build()
        .expect("an HTTP client")
}

/// `GET /v1/info` of `node`.
fn info(client: &reqwest::blocking::Client, node: &gaia_tests::Node) -> serde_json::Value {
    client
        .get(format!("{}/v1/info", node.url))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("GET /v1/info of {}: {e}", node.url))
}

/// Runs `gaia init --no-models` in `dir` and returns the address it printed.
fn init_address(dir: &std::path::Path) -> String {
    let out = gaia_tests::gaia(dir, &["init", "--no-models"]);
    assert!(out.status.success(), "{}", gaia_tests::text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("address: "))
        .map(|a| a.trim().to_string())
        .unwrap_or_else(|| panic!("gaia init printed no address: {}", gaia_tests::text(&out)))
}
