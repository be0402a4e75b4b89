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
