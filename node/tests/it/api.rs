//! The HTTP API of a real `gaia start` process, with the real default models from
//! `$GAIA_MODELS_DIR` (a model store: `<name>/<files>`), on a free port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gaia_node::models::DEFAULT_CHAT;
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m-instruct";

/// A running node; killed when dropped.
pub(crate) struct Node {
    child: Child,
    base: String,
    key: Option<String>,
    http: reqwest::blocking::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    pub(crate) fn start(config: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        gaia_tests::link_models(&gaia_tests::models_dir(), dir.path());
        std::fs::write(dir.path().join("gaia.toml"), config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gaia"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--quiet", "start", "--port", "0"])
            .env_remove("GAIA_SERVER_PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the gaia binary runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("gaia: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the node printed its listen address");
        Node {
            child,
            base,
            key: None,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
            _dir: dir,
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    pub(crate) fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::POST, path)
            .json(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub(crate) fn get(&self, path: &str) -> (u16, String) {
        let r = self.req(reqwest::Method::GET, path).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    }

    fn wait_metric(&self, name: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.metric(name) != want {
            assert!(Instant::now() < deadline, "{name} never became {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Streams a chat request; returns the `data:` payloads.
    fn stream(&self, body: &Value) -> Vec<String> {
        let r = self
            .req(reqwest::Method::POST, "/v1/chat/completions")
            .json(body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        r.text()
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

pub(crate) const NO_KB: &str = "[knowledge]\nenabled = false\n";

pub(crate) fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn content(resp: &Value) -> String {
    resp["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn reassemble(events: &[String]) -> (String, Vec<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (text, chunks)
}

#[test]
fn chat_stream_structured_output_rag_and_errors() {
    let node = Node::start("");
    let (status, body) = node.get("/health");
    assert_eq!(status, 200, "{body}");

    // Models.
    let (_, models) = node.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);

    // Non-streaming, with usage.
    let (status, r) = node.post(
        "/v1/chat/completions",
        &chat("Say hello.", json!({"rag": false})),
    );
    assert_eq!(status, 200, "{r}");
    let answer = content(&r);
    assert!(!answer.is_empty(), "{r}");
    let usage = &r["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5, "{r}");
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion), "{r}");
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    assert_eq!(r["object"], "chat.completion");

    // Streaming gives the same greedy text, and usage at the end.
    let events = node.stream(&chat(
        "Say hello.",
        json!({"rag": false, "stream": true, "stream_options": {"include_usage": true}}),
    ));
    let (text, chunks) = reassemble(&events);
    assert_eq!(text, answer);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][key], usage[key], "{last}");
    }
    // The same prompt again: all of it but its last token came from the prefix cache.
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0, "{r}");
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() - 1,
        "{last}"
    );

    // A chat's next turn runs only its new tokens: the first turn's prompt and answer are
    // reused, and the answer is what a cold run gives.
    let turn2 = |answer: &str| {
        json!({"model": MODEL, "temperature": 0, "max_tokens": 12, "rag": false, "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Now say goodbye."}]})
    };
    let (status, second) = node.post("/v1/chat/completions", &turn2(&answer));
    assert_eq!(status, 200, "{second}");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= usage["prompt_tokens"].as_u64().unwrap()
            && cached < second["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{second}"
    );
    assert!(node.metric("gaia_prefix_cache_hits_total") >= 2.0);
    assert!(node.metric("gaia_prefix_cache_bytes") > 0.0);
    let cold = Node::start("[server]\nprefix_cache_mb = 0\n");
    let (_, again) = cold.post("/v1/chat/completions", &turn2(&answer));
    assert_eq!(content(&again), content(&second), "{again}");
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(cold.metric("gaia_prefix_cache_budget_bytes"), 0.0);
    drop(cold);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string())
    );

    // Seeds: the same seed repeats a sampled answer.
    let seeded = chat(
        "Write a word.",
        json!({"rag": false, "temperature": 1.0, "seed": 42}),
    );
    let a = content(&node.post("/v1/chat/completions", &seeded).1);
    let b = content(&node.post("/v1/chat/completions", &seeded).1);
    assert_eq!(a, b);

    // Stop sequences end the answer before them.
    let long = chat(
        "Count from 1 to 20, separated by commas.",
        json!({"rag": false, "max_tokens": 60}),
    );
    let full = content(&node.post("/v1/chat/completions", &long).1);
    if let Some(pos) = full.find('5') {
        let mut stopped = long.clone();
        stopped["stop"] = json!(["5"]);
        let (_, r) = node.post("/v1/chat/completions", &stopped);
        assert_eq!(content(&r), full[..pos], "{full}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    // json_schema output parses and validates.
    let schema = json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"], "additionalProperties": false});
    let (status, r) = node.post(
        "/v1/chat/completions",
        &chat(
            "Give a person's name and age as JSON.",
            json!({"rag": false, "max_tokens": 60, "response_format":
            {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    let person: Value = serde_json::from_str(&content(&r)).expect("the answer is JSON");
    assert!(
        person["name"].is_string() && person["age"].is_i64(),
        "{person}"
    );
    assert_eq!(person.as_object().unwrap().len(), 2);

    // tool_choice required, one call: a valid call of the given tool within 60 tokens.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
        "additionalProperties": false}}}]);
    let (status, r) = node.post(
        "/v1/chat/completions",
        &chat(
            "What is the weather in Paris?",
            json!({"rag": false, "max_tokens": 60, "tools": tools, "tool_choice": "required",
                "parallel_tool_calls": false}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    let call = &r["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    // ... and streamed as a tool_calls delta.
    let events = node.stream(&chat(
        "What is the weather in Paris?",
        json!({"rag": false, "max_tokens": 60, "tools": tools, "tool_choice": "required",
            "parallel_tool_calls": false, "stream": true}),
    ));
    let (_, chunks) = reassemble(&events);
    assert!(
        chunks.iter().any(
            |c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
        ),
        "{events:?}"
    );

    // RAG: the demo knowledge base answers about Gaia, with sources.
    let (status, r) = node.post(
        "/v1/chat/completions",
        &chat("What is Gaia?", json!({"max_tokens": 16})),
    );
    assert_eq!(status, 200, "{r}");
    let sources = r["sources"].as_array().expect("sources");
    assert!(!sources.is_empty());
    assert!(sources[0]["source"].is_string() && sources[0]["score"].is_number());
    let (status, hits) = node.post(
        "/v1/retrieve",
        &json!({"query": "What is Gaia?", "top_k": 2}),
    );
    assert_eq!(status, 200, "{hits}");
    assert!(!hits["data"].as_array().unwrap().is_empty());

    // Completions and embeddings.
    let (status, r) = node.post("/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}));
    assert_eq!(status, 200, "{r}");
    assert!(r["choices"][0]["text"].is_string());
    let (status, r) = node.post(
        "/v1/embeddings",
        &json!({"model": "all-minilm-l6-v2", "input": ["hello", "world"]}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"][1]["embedding"].as_array().unwrap().len(), 384);

    // Errors: unknown model, hostile numbers, malformed bodies, huge bodies.
    let (status, r) = node.post(
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(status, 404, "{r}");
    assert_eq!(r["error"]["code"], "model_not_found");
    for (extra, param) in [
        (json!({"n": 1000}), "n"),
        (json!({"max_tokens": 10_000_000}), "max_tokens"),
        (json!({"temperature": -1}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"logit_bias": {"1": 500}}), "logit_bias"),
        (json!({"stop": vec!["x"; 100]}), "stop"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"frobnicate": true}), "frobnicate"),
    ] {
        let started = Instant::now();
        let (status, r) = node.post("/v1/chat/completions", &chat("x", extra.clone()));
        assert_eq!(status, 400, "{extra}: {r}");
        assert_eq!(r["error"]["param"], param, "{extra}: {r}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let (status, r) = node.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": []}),
    );
    assert_eq!(status, 400, "{r}");
    let raw = |bytes: Vec<u8>| {
        let r = node
            .req(reqwest::Method::POST, "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str::<Value>(&r.text().unwrap()).unwrap(),
        )
    };
    let (status, r) = raw(b"{\"model\": ".to_vec());
    assert_eq!(status, 400);
    assert!(r["error"]["message"].is_string());
    let (status, _) = raw(b"{\"model\": \"\xff\xfe\"}".to_vec());
    assert_eq!(status, 400);
    // A body announced larger than server.max_body_bytes is refused before it is read.
    let host = node.base.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(host).unwrap();
    write!(tcp, "POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{{", 5 << 20).unwrap();
    let mut reply = String::new();
    let _ = tcp.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
    let huge = "word ".repeat(12_000);
    let (status, r) = node.post("/v1/chat/completions", &chat(&huge, json!({"rag": false})));
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["code"], "context_length_exceeded", "{r}");

    // Info, metrics, OpenAPI.
    let (_, info) = node.get("/v1/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["models"]["chat"]["sha256"],
        DEFAULT_CHAT.files[0].sha256
    );
    assert!(info["knowledge_base"]["hash"].is_string(), "{info}");
    let (_, metrics) = node.get("/metrics");
    for needle in [
        "gaia_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
        "gaia_http_requests_total{route=\"/v1/chat/completions\",status=\"404\"}",
        "gaia_http_request_duration_seconds_bucket{route=\"/v1/chat/completions\"",
        "gaia_completion_tokens_total",
        "gaia_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    let (status, spec) = node.get("/openapi.json");
    assert_eq!(status, 200);
    let spec: Value = serde_json::from_str(&spec).unwrap();
    assert!(spec["paths"]["/v1/chat/completions"].is_object());
    let (status, _) = node.get("/health");
    assert_eq!(status, 200);
}

/// Suppresses both end tokens of SmolLM2 so a generation runs to max_tokens.
fn endless(extra: Value) -> Value {
    chat(
        "Tell me a long story.",
        json!({"max_tokens": 1500, "logit_bias": {"0": -100, "2": -100}}),
    )
    .as_object()
    .map(|o| {
        let mut o = o.clone();
        for (k, v) in extra.as_object().unwrap() {
            o.insert(k.clone(), v.clone());
        }
        Value::Object(o)
    })
    .unwrap()
}

#[test]
fn keys_queue_limit_and_disconnects() {
    let mut node = Node::start(&format!(
        "[server]\napi_keys = [\"k-123\"]\nqueue_depth = 1\nworkers = 1\nbatch_size = 2\n{NO_KB}"
    ));
    // Keys: /health is open, everything else needs the key.
    assert_eq!(node.get("/health").0, 200);
    assert_eq!(node.get("/v1/models").0, 401);
    node.key = Some("k-124".into());
    let (status, r) = node.post("/v1/chat/completions", &chat("hi", json!({})));
    assert_eq!(status, 401, "{r}");
    node.key = Some("k-123".into());
    assert_eq!(node.get("/v1/models").0, 200);
    // Anthropic's clients send the key as `x-api-key`, and get Anthropic's error body.
    let messages = |key: &str| {
        let r = node
            .http
            .post(format!("{}/v1/messages", node.base))
            .header("x-api-key", key)
            .json(&json!({"model": "default", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, r) = messages("k-124");
    assert_eq!(status, 401, "{r}");
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["error"]["type"], "authentication_error", "{r}");
    let (status, r) = messages("k-123");
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["type"], "message", "{r}");
    // Its generation may still hold its batch slot for a moment after the answer.
    node.wait_metric("gaia_generations_in_flight", 0.0);

    // Two generations run together (a batch of two), the third waits, the fourth is refused.
    let open_stream = |node: &Node| {
        let r = node
            .req(reqwest::Method::POST, "/v1/chat/completions")
            .json(&endless(json!({"stream": true})))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r
    };
    let first = open_stream(&node);
    node.wait_metric("gaia_generations_in_flight", 1.0);
    let beside = open_stream(&node);
    node.wait_metric("gaia_generations_in_flight", 2.0);
    let second = open_stream(&node);
    node.wait_metric("gaia_queue_depth", 1.0);
    let (status, r) = {
        let resp = node
            .req(reqwest::Method::POST, "/v1/chat/completions")
            .json(&endless(json!({})))
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        assert!(resp.headers().get("retry-after").is_some());
        (status, resp.json::<Value>().unwrap())
    };
    assert_eq!(status, 429, "{r}");
    assert_eq!(r["error"]["type"], "rate_limit_error");

    // Both running streams deliver chunks; dropping the streams cancels every generation.
    let (mut first, mut beside) = (first, beside);
    let mut buf = [0u8; 256];
    assert!(
        first.read(&mut buf).unwrap() > 0,
        "the first stream delivers chunks"
    );
    assert!(
        beside.read(&mut buf).unwrap() > 0,
        "the stream beside it delivers chunks"
    );
    drop(first);
    drop(beside);
    drop(second);
    node.wait_metric("gaia_queue_depth", 0.0);
    node.wait_metric("gaia_generations_in_flight", 0.0);

    // A non-streaming client that gives up cancels its generation too.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let sent = impatient
        .post(format!("{}/v1/chat/completions", node.base))
        .bearer_auth("k-123")
        .json(&endless(json!({})))
        .send();
    assert!(
        sent.is_err(),
        "the request should time out on the client side"
    );
    node.wait_metric("gaia_generations_in_flight", 0.0);
    let (status, r) = node.post(
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": 4})),
    );
    assert_eq!(status, 200, "{r}");
}

/// A one-request-at-a-time HTTP server that answers every POST with `reply` and sends the
/// request bodies it received.
fn tool_server(reply: &'static str) -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::sync_channel(8);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let _ = tx.try_send(String::from_utf8_lossy(&body).into_owned());
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (format!("http://{addr}/weather"), rx)
}

#[test]
fn node_executed_tool_round_trip() {
    let (url, received) = tool_server(r#"{"temperature_c": 21, "sky": "clear"}"#);
    let node = Node::start(&format!(
        "[agent]\nmax_tool_rounds = 2\n{NO_KB}\n[tools_policy]\nallow_hosts = [\"127.0.0.1\"]\n\n\
         [[tools]]\nname = \"get_weather\"\ndescription = \"Current weather of a city\"\n\
         url = \"{url}\"\n[tools.parameters]\ntype = \"object\"\nrequired = [\"city\"]\n\
         additionalProperties = false\n[tools.parameters.properties.city]\ntype = \"string\"\n\
         maxLength = 30\n"
    ));
    let (status, r) = node.post("/v1/chat/completions", &chat(
        "What is the weather in Paris?",
        json!({"max_tokens": 80, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ));
    assert_eq!(status, 200, "{r}");
    let body = received
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("the tool was not called: {r}"));
    let args: Value = serde_json::from_str(&body).unwrap();
    assert!(args["city"].is_string(), "{args}");
    let results = r["tool_results"].as_array().expect("tool_results");
    assert_eq!(results[0]["name"], "get_weather");
    assert_eq!(results[0]["ok"], true, "{r}");
    assert!(results[0]["result"].as_str().unwrap().contains("clear"));
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let (_, metrics) = node.get("/metrics");
    assert!(
        metrics.contains("gaia_tool_calls_total{tool=\"get_weather\",ok=\"true\"}"),
        "{metrics}"
    );
}

/// The README's example on a fresh node, sent as the README sends it (no sampling fields, no
/// `max_tokens`): hybrid retrieval hands the model the passage with `gaia kb ingest` first,
/// and the agent's defaults bound the answer. A node whose `[agent] max_tokens` is 8 stops
/// the same request at 8 tokens, so the default is what bounds it.
#[test]
fn the_readme_question_is_answered_from_the_ingest_passage_within_the_default_length() {
    let question = json!({"model": "default",
        "messages": [{"role": "user", "content": "How do I add documents to my node?"}]});
    let ingest_first = |sources: &Value| {
        let first = sources[0]["text"].as_str().unwrap_or_default();
        assert!(
            first.contains("gaia kb ingest"),
            "the first source is not the ingest passage: {sources}"
        );
    };
    let node = Node::start("");
    let (status, r) = node.post("/v1/chat/completions", &question);
    assert_eq!(status, 200, "{r}");
    ingest_first(&r["sources"]);
    let used = r["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        (1..=512).contains(&used),
        "{used} tokens: beyond the agent's default length"
    );
    assert!(!content(&r).trim().is_empty(), "{r}");
    // Streamed, as the README does.
    let mut streamed = question.clone();
    streamed["stream"] = json!(true);
    let (text, chunks) = reassemble(&node.stream(&streamed));
    assert!(!text.trim().is_empty());
    let last = chunks.last().unwrap();
    ingest_first(&last["sources"]);
    let tokens = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    assert!(tokens <= 512, "{tokens} chunks");
    // A question that shares only a digit or a word with the documents gets no context.
    for q in ["Count to 0.", "hello"] {
        let (status, r) = node.post("/v1/chat/completions", &chat(q, json!({"max_tokens": 2})));
        assert_eq!(status, 200, "{r}");
        assert!(r.get("sources").is_none(), "{q}: {r}");
    }
    drop(node);

    let short = Node::start("[agent]\nmax_tokens = 8\n");
    let (status, r) = short.post("/v1/chat/completions", &question);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 8, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    // A request's own max_tokens wins over the default.
    let mut longer = question.clone();
    longer["max_tokens"] = json!(12);
    longer["temperature"] = json!(0);
    let (status, r) = short.post("/v1/chat/completions", &longer);
    assert_eq!(status, 200, "{r}");
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() > 8, "{r}");
}
