//! The web UI in a real headless browser: Debian's chromium driven through chromedriver
//! (W3C WebDriver over HTTP) against a real `gaia start` in a domain of two nodes. The test
//! sets the chat's settings, types a message and watches the answer stream in, finds the other
//! member (its load and price) and the node that served the answer in the domain view, and
//! uploads a document in the knowledge view; it takes a screenshot of each view (PNG files in
//! `$GAIA_SCREENSHOT_DIR`, by default `target/ui-screenshots`).
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`;
//! tests/run installs them as root). `GAIA_CHROMEDRIVER` and `GAIA_CHROMIUM` override the paths.
//! A missing browser fails the test; it is never skipped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use base64::Engine as _;
use gaia_tests::{CHAT_MODEL, Node, link_models, models_dir, open_domain};

const INSTALL_HINT: &str = "install Debian's chromium and chromium-driver \
     (apt-get install chromium chromium-driver; tests/run does it when run as root) or set \
     GAIA_CHROMEDRIVER and GAIA_CHROMIUM";

/// The W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    names.iter().find_map(|name| {
        dirs.iter()
            .map(|d| d.join(name))
            .chain([
                PathBuf::from("/usr/bin").join(name),
                PathBuf::from("/usr/lib/chromium").join(name),
            ])
            .find(|p| p.is_file())
    })
}

/// A chromedriver process; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(program: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port for chromedriver")
            .port();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_HINT}", program.display()));
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::blocking::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .get(format!("{}/status", driver.url))
                .timeout(Duration::from_secs(2))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == json!(true));
            if ready {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One WebDriver session.
struct Session {
    client: reqwest::blocking::Client,
    base: String,
}

impl Session {
    fn new(driver: &Driver, chromium: Option<&Path>) -> Session {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("an HTTP client");
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-extensions", "--window-size=1200,900"],
        });
        if let Some(binary) = chromium {
            options["binary"] = json!(binary.to_string_lossy());
        }
        let body = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let response: Value = client
            .post(format!("{}/session", driver.url))
            .json(&body)
            .send()
            .and_then(|r| r.json())
            .expect("chromedriver answers a new-session request");
        let id = response["value"]["sessionId"].as_str().unwrap_or_else(|| {
            panic!("chromedriver could not start chromium ({INSTALL_HINT}): {response}")
        });
        Session {
            base: format!("{}/session/{id}", driver.url),
            client,
        }
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response: Value = request
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        if let Some(error) = response["value"]["error"].as_str() {
            panic!(
                "webdriver {method} {path}: {error}: {}",
                response["value"]["message"]
            );
        }
        response["value"].clone()
    }

    fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body))
    }

    fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url}));
    }

    fn find(&self, css: &str) -> String {
        let value = self.post("/element", json!({"using": "css selector", "value": css}));
        value[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {value}"))
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.post(&format!("/element/{id}/value"), json!({"text": text}));
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.post(&format!("/element/{id}/click"), json!({}));
    }

    fn script(&self, source: &str) -> Value {
        self.post("/execute/sync", json!({"script": source, "args": []}))
    }

    /// Waits until `source` returns a truthy value.
    fn wait_for(&self, what: &str, timeout: Duration, source: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.script(source);
            if !(value.is_null() || value == json!(false) || value == json!("")) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A screenshot of the page, saved as `<name>.png` in the screenshot directory; returns
    /// its path after checking it is a PNG of the window's width.
    fn screenshot(&self, name: &str) -> PathBuf {
        let encoded = self.call(reqwest::Method::GET, "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("the screenshot is base64");
        assert_eq!(
            &png[..8],
            b"\x89PNG\r\n\x1a\n",
            "the screenshot of {name} is not a PNG"
        );
        let width = u32::from_be_bytes(png[16..20].try_into().expect("an IHDR width"));
        assert_eq!(
            width, 1200,
            "the screenshot of {name} is not the window's width"
        );
        let dir = std::env::var_os("GAIA_SCREENSHOT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots")
            });
        std::fs::create_dir_all(&dir).expect("the screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).expect("the screenshot is written");
        println!(
            "screenshot of the {name} view: {} ({} bytes)",
            path.display(),
            png.len()
        );
        path
    }

    /// The browser's console log, or why it could not be read.
    fn browser_log(&self) -> String {
        let response = self
            .client
            .post(format!("{}/se/log", self.base))
            .json(&json!({"type": "browser"}))
            .send()
            .and_then(|r| r.json::<Value>());
        match response {
            Ok(v) => v["value"]
                .as_array()
                .map(|entries| {
                    entries
                        .iter()
                        .map(|e| format!("{} {}", e["level"], e["message"]))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_else(|| format!("(no browser log: {v})")),
            Err(e) => format!("(no browser log: {e})"),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.client.delete(&self.base).send();
    }
}

#[test]
fn the_web_ui_streams_an_answer_in_a_real_browser() {
    let driver_program = find_program("GAIA_CHROMEDRIVER", &["chromedriver"])
        .unwrap_or_else(|| panic!("chromedriver is not installed: {INSTALL_HINT}"));
    let chromium = find_program("GAIA_CHROMIUM", &["chromium", "chromium-browser"]);
    assert!(
        chromium.is_some(),
        "chromium is not installed: {INSTALL_HINT}"
    );

    // A domain of two nodes: the browser talks to the first; the second is its member.
    let models = models_dir();
    let env = [("GAIA_SWARM_HEARTBEAT_MS", "1000")];
    let (operator, _shared, manifest) = open_domain("ui");
    link_models(&models, operator.path());
    let node = Node::launch(operator, &["--domain", &manifest, "--p2p-port", "0"], &env);
    let boot = node.loopback_p2p();
    let member_dir = tempfile::tempdir().expect("a data directory");
    link_models(&models, member_dir.path());
    let member = Node::launch(
        member_dir,
        &[
            "--domain",
            &manifest,
            "--p2p-port",
            "0",
            "--bootstrap",
            &boot,
        ],
        &env,
    );
    let member_id = reqwest::blocking::get(format!("{}/v1/info", member.url))
        .and_then(|r| r.json::<Value>())
        .expect("the member's /v1/info")["swarm"]["node"]
        .as_str()
        .expect("the member's node id")
        .to_string();

    let driver = Driver::start(&driver_program);
    let session = Session::new(&driver, chromium.as_deref());
    session.goto(&format!("{}/", node.url));

    let title = session.script("return document.title;");
    assert_eq!(title, json!("Gaia chat"), "the page did not load");
    // The model picker is filled from /v1/models.
    session.wait_for(
        "the model picker to list the chat model",
        Duration::from_secs(20),
        &format!(
            "return [...document.querySelectorAll('#model option')].some(o => o.value === '{CHAT_MODEL}');"
        ),
    );

    // Settings: enough tokens to see the answer grow; greedy so the run is repeatable. The
    // view also shows the node's facts from /v1/info.
    session.click("#tab-settings");
    session.type_into("#max-tokens", "48");
    session.type_into("#temperature", "0");
    let facts = session.wait_for(
        "the settings view to show the node's facts",
        Duration::from_secs(20),
        "const f = document.querySelector('#node-facts').textContent; \
         return f.includes('Chat model') && f.includes('Domain') ? f : null;",
    );
    assert!(
        facts.as_str().unwrap_or("").contains(CHAT_MODEL),
        "the settings view does not name the chat model: {facts}"
    );
    session.screenshot("settings");

    session.click("#tab-chat");
    session.type_into("#prompt", "Write a short poem about the sea.");
    session.click("#send");

    // Sample the answer's text while it streams.
    let read = "const all = document.querySelectorAll('#messages .msg.assistant'); \
                const m = all[all.length - 1]; if (!m) return null; \
                return {state: m.dataset.state || '', \
                        text: m.querySelector('.content').textContent, \
                        failure: (m.querySelector('.error') || {}).textContent || '', \
                        stopVisible: !document.querySelector('#stop').hidden};";
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut lengths_while_streaming = Vec::new();
    let mut saw_stop_button = false;
    let final_state = loop {
        let value = session.script(read);
        if !value.is_null() {
            let state = value["state"].as_str().unwrap_or("").to_string();
            let text = value["text"].as_str().unwrap_or("").to_string();
            if state == "streaming" {
                saw_stop_button |= value["stopVisible"] == json!(true);
                let len = text.chars().count();
                if len > 0 && lengths_while_streaming.last() != Some(&len) {
                    lengths_while_streaming.push(len);
                }
            } else if !state.is_empty() {
                break value;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no finished answer after 180 s; browser log:\n{}\nnode stderr:\n{}",
            session.browser_log(),
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(15));
    };

    let text = final_state["text"]
        .as_str()
        .unwrap_or("")
        .trim()
        .to_string();
    assert_eq!(
        final_state["state"],
        json!("done"),
        "the answer ended in state {} with error {:?}; browser log:\n{}\nnode stderr:\n{}",
        final_state["state"],
        final_state["failure"],
        session.browser_log(),
        node.stderr()
    );
    assert!(!text.is_empty(), "the final answer is empty");
    assert!(
        lengths_while_streaming.len() >= 2,
        "the answer did not grow while streaming (lengths seen: {lengths_while_streaming:?}); \
         final text: {text:?}"
    );
    assert!(
        lengths_while_streaming.windows(2).all(|w| w[0] < w[1]),
        "the streamed text shrank: {lengths_while_streaming:?}"
    );
    assert!(
        saw_stop_button,
        "the stop button was not shown while streaming"
    );
    // The send button is back and the usage line is shown.
    let after = session.script(
        "const all = document.querySelectorAll('#messages .msg.assistant .meta'); \
         return {send: !document.querySelector('#send').hidden, \
                 meta: all.length ? all[all.length - 1].textContent : ''};",
    );
    assert_eq!(
        after["send"],
        json!(true),
        "the send button did not come back"
    );
    assert!(
        after["meta"]
            .as_str()
            .unwrap_or("")
            .contains("completion tokens"),
        "no usage shown: {after}"
    );
    let meta = after["meta"].as_str().unwrap_or("");
    assert!(
        meta.contains("served by"),
        "the answer does not say who served it: {meta}"
    );
    session.screenshot("chat");

    // Domain: the other member with its load and price, and who served the answer.
    session.click("#tab-domain");
    let row = session.wait_for(
        "the domain view to list the member",
        Duration::from_secs(90),
        &format!(
            "document.querySelector('#domain-refresh').click(); \
             const r = document.querySelector('#members-body tr[data-node=\"{member_id}\"]'); \
             return r ? [...r.cells].map(c => c.textContent) : null;"
        ),
    );
    let cells: Vec<&str> = row
        .as_array()
        .expect("the member's cells")
        .iter()
        .map(|c| c.as_str().unwrap_or(""))
        .collect();
    assert_eq!(cells.len(), 7, "the member's row: {cells:?}");
    assert_eq!(cells[1], CHAT_MODEL, "the member's model: {cells:?}");
    assert!(
        cells[3].parse::<u32>().is_ok() && cells[4].parse::<u32>().is_ok(),
        "load: {cells:?}"
    );
    assert!(
        cells[5] == "free" || cells[5].contains('·'),
        "price: {cells:?}"
    );
    let served = session
        .script("return [...document.querySelectorAll('#served li')].map(l => l.textContent);");
    let served = served.as_array().expect("the served list");
    assert_eq!(served.len(), 1, "one answer on this page: {served:?}");
    assert!(
        served[0].as_str().unwrap_or("").contains("sea"),
        "the served list names the question: {served:?}"
    );
    session.screenshot("domain");

    // Knowledge: the documents with their chunk counts, and an upload through the page.
    session.click("#tab-knowledge");
    let before = session.wait_for(
        "the knowledge view to list the documents",
        Duration::from_secs(20),
        "const s = document.querySelector('#kb-summary').textContent; \
         return s.includes('chunk') ? s : null;",
    );
    let upload_dir = tempfile::tempdir().expect("a directory for the upload");
    let upload = upload_dir.path().join("harbour-guide.md");
    std::fs::write(
        &upload,
        "# Harbour guide\n\nThe harbour of Port Gaia opens at six. Ferries leave from pier \
         three every hour.\n\n## Fees\n\nMooring costs twelve coins a night.\n",
    )
    .expect("the upload is written");
    let file_input = session.find("#kb-file");
    session.post(
        &format!("/element/{file_input}/value"),
        json!({"text": upload.to_string_lossy()}),
    );
    session.click("#kb-add");
    let added = session.wait_for(
        "the uploaded document to be listed",
        Duration::from_secs(60),
        "const r = document.querySelector('#documents-body tr[data-source=\"harbour-guide.md\"]'); \
         return r ? [...r.cells].map(c => c.textContent) : null;",
    );
    let chunks: usize = added[3].as_str().unwrap_or("").parse().unwrap_or(0);
    assert!(chunks >= 1, "the uploaded document has no chunks: {added}");
    assert_eq!(added[2], json!("markdown"), "its type: {added}");
    let listed: Value = reqwest::blocking::get(format!("{}/v1/kb/documents", node.url))
        .and_then(|r| r.json())
        .expect("GET /v1/kb/documents");
    let doc = listed["data"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["source"] == "harbour-guide.md"))
        .unwrap_or_else(|| panic!("the node does not list the upload: {listed}"));
    assert_eq!(
        doc["chunks"],
        json!(chunks),
        "the page and the node disagree"
    );
    let after_upload = session.script("return document.querySelector('#kb-summary').textContent;");
    assert_ne!(
        after_upload, before,
        "the summary did not change after the upload"
    );
    session.screenshot("knowledge");

    // The page itself ran without script errors (a CSP violation would be logged here too).
    let log = session.browser_log();
    assert!(!log.contains("SEVERE"), "the browser logged errors:\n{log}");
    println!(
        "streamed answer ({} samples while streaming: {:?}): {text}",
        lengths_while_streaming.len(),
        lengths_while_streaming
    );
}
