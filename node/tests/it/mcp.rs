//! MCP tools (`[[mcp]]`): a real MCP server, `tests/conformance/mcp_server.py`, written with
//! the official `mcp` package (pinned in tests/conformance/requirements.txt), that the node
//! spawns over stdio or reaches over streamable HTTP. The model is forced to call its tools;
//! the server logs every call it really received to a file the test reads.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::api::{NO_KB, Node, chat};
use crate::conformance::python;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/mcp_server.py")
}

/// The calls the server logged.
fn calls(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `/v1/info`'s entry for the first MCP server once it is `ready` with `tools` tools.
fn wait_ready(node: &Node, tools: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, info) = node.get("/v1/info");
        let info: Value = serde_json::from_str(&info).unwrap();
        let server = info["mcp"][0].clone();
        if server["state"] == "ready" && server["tools"].as_array().map(Vec::len) == Some(tools) {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "the MCP server never became ready: {server}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A chat that must call `tool`; returns the response.
fn force(node: &Node, tool: &str, question: &str) -> Value {
    let (status, r) = node.post(
        "/v1/chat/completions",
        &chat(
            question,
            json!({"max_tokens": 60,
                "tool_choice": {"type": "function", "function": {"name": tool}}}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    r
}

/// The first node-executed call's record in a response.
fn executed(r: &Value) -> &Value {
    let results = r["tool_results"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_results: {r}"));
    &results[0]
}

/// Forces a call of `tool`, which must fail with an error containing `says`.
fn failed_with(node: &Node, tool: &str, says: &str) {
    let r = force(node, tool, "Go ahead.");
    let call = executed(&r);
    assert_eq!(call["ok"], false, "{r}");
    assert!(
        call["result"].as_str().unwrap().contains(says),
        "{tool}: {call}"
    );
}

/// Kills the processes whose command line contains `marker`.
fn kill_matching(marker: &str) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            // SAFETY: kill(2) on a pid we read; no memory is touched.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

#[test]
fn mcp_tools_over_stdio_are_listed_called_guarded_and_survive_a_dead_server() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.jsonl");
    let python = python();
    let config = format!(
        "[agent]\nmax_tool_rounds = 2\n{NO_KB}\n[[mcp]]\nname = \"station\"\n\
         command = [{python:?}, {script:?}, \"--stdio\", {marker:?}]\n\
         tools = [\"get_weather\", \"broken\", \"flood\"]\ntimeout_secs = 30\n\
         max_response_bytes = 4096\n[mcp.env]\nGAIA_MCP_LOG = {log:?}\n",
        python = python.display().to_string(),
        script = script().display().to_string(),
        marker = log.display().to_string(),
        log = log.display().to_string(),
    );
    let node = Node::start(&config);
    let server = wait_ready(&node, 3);
    assert_eq!(server["transport"], "stdio", "{server}");
    assert_eq!(server["server"], "gaia-test-mcp 1.0", "{server}");
    assert_eq!(server["tools"], json!(["get_weather", "broken", "flood"]));

    // A forced call runs on the server with the model's arguments, and the result goes back
    // to the model, which answers.
    let r = force(&node, "get_weather", "What is the weather in Paris?");
    let call = executed(&r);
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["ok"], true, "{r}");
    let result = call["result"].as_str().unwrap();
    assert!(
        result.contains("21 C") && result.contains("over stdio"),
        "{result}"
    );
    let seen = calls(&log);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["tool"], "get_weather");
    assert_eq!(seen[0]["arguments"]["city"], call["arguments"]["city"]);
    assert!(!seen[0]["arguments"]["city"].as_str().unwrap().is_empty());
    let (_, metrics) = node.get("/metrics");
    assert!(
        metrics.contains("gaia_tool_calls_total{tool=\"get_weather\",ok=\"true\"}"),
        "{metrics}"
    );

    // A tool that fails: the server's error reaches the model as an error.
    failed_with(&node, "broken", "the station is offline");
    // A result over max_response_bytes is refused, not handed to the model.
    failed_with(&node, "flood", "larger than 4096");
    // A tool outside the allow-list is not offered.
    let (status, r) = node.post(
        "/v1/chat/completions",
        &chat(
            "Hi",
            json!({"tool_choice": {"type": "function", "function": {"name": "hidden"}}}),
        ),
    );
    assert_eq!(status, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not among the tools"),
        "{r}"
    );
    assert!(calls(&log).iter().all(|c| c["tool"] != "hidden"));

    // The server dies: the node starts it again, and the tools work again.
    assert!(kill_matching(&log.display().to_string()) >= 1);
    let deadline = Instant::now() + Duration::from_secs(90);
    let before = calls(&log).len();
    loop {
        let r = force(&node, "get_weather", "What is the weather in Oslo?");
        if executed(&r)["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the node never reconnected: {r}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(calls(&log).len(), before + 1);
}

/// A server process; killed when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn mcp_tools_over_streamable_http() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.jsonl");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Spawned(
        Command::new(python())
            .arg(script())
            .args(["--http", &port.to_string()])
            .env("GAIA_MCP_LOG", &log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the MCP server never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    let node = Node::start(&format!(
        "[agent]\nmax_tool_rounds = 2\n{NO_KB}\n[tools_policy]\nallow_hosts = [\"127.0.0.1\"]\n\
         [[mcp]]\nname = \"remote\"\nurl = \"http://127.0.0.1:{port}/mcp\"\nprefix = \"remote_\"\n\
         tools = [\"get_weather\"]\ntimeout_secs = 30\n"
    ));
    let server = wait_ready(&node, 1);
    assert_eq!(server["transport"], "streamable-http", "{server}");
    assert_eq!(server["tools"], json!(["remote_get_weather"]));
    let r = force(&node, "remote_get_weather", "What is the weather in Rome?");
    let call = executed(&r);
    assert_eq!(call["name"], "remote_get_weather");
    assert_eq!(call["ok"], true, "{r}");
    assert!(
        call["result"].as_str().unwrap().contains("over http"),
        "{call}"
    );
    let seen = calls(&log);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["tool"], "get_weather");
    assert_eq!(seen[0]["transport"], "http");
}
