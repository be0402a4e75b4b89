//! The bad-input battery against a real `gaia start`: malformed and hostile requests each get a
//! 4xx quickly, never a 5xx; `/health` stays green after each; the next valid request succeeds.
//!
//! Requests go over raw TCP (`std::net`) so that the test can send what an HTTP library would
//! refuse to produce: broken JSON, invalid UTF-8, lying lengths, oversized headers.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gaia_tests::{CHAT_MODEL, EMBEDDING_MODEL, Node};

/// How long a cheap bad request may take to be answered.
const QUICK: Duration = Duration::from_secs(1);
/// How long a 50 MB upload may take to be refused.
const UPLOAD: Duration = Duration::from_secs(5);
/// How long the test waits for any answer at all.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// What a request sends after its head.
enum Body {
    /// These exact bytes, with a `Content-Length` unless the head already has one.
    Bytes(Vec<u8>),
    /// `len` bytes of JSON-ish filler, announced with `Content-Length`.
    Huge { len: usize },
    /// `len` bytes of filler as chunked transfer encoding.
    HugeChunked { len: usize },
}

/// One case of the battery.
struct Case {
    name: String,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Body,
    limit: Duration,
    /// The node answers this with a 2xx today (lenient, not a crash); it still must not be a
    /// 5xx or slow. Listed in the test output so it can be tightened.
    lenient: bool,
}

/// What came back.
struct Answer {
    status: Option<u16>,
    elapsed: Duration,
    head: String,
    error: Option<String>,
}

fn case(name: &str, method: &'static str, path: &str, body: Body) -> Case {
    Case {
        name: name.to_string(),
        method,
        path: path.to_string(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        body,
        limit: QUICK,
        lenient: false,
    }
}

fn json(name: &str, path: &str, body: &str) -> Case {
    case(name, "POST", path, Body::Bytes(body.as_bytes().to_vec()))
}

/// A chat request with the given extra top-level fields (raw JSON text) and `max_tokens: 1`.
fn chat(name: &str, extra: &str) -> Case {
    json(
        name,
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":1,{extra}}}"#
        ),
    )
}

/// A chat request with the given extra fields and no `max_tokens`.
fn chat_bare(name: &str, extra: &str) -> Case {
    json(
        name,
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#
        ),
    )
}

/// A chat request with these messages (raw JSON).
fn chat_messages(name: &str, messages: &str) -> Case {
    json(
        name,
        "/v1/chat/completions",
        &format!(r#"{{"model":"{CHAT_MODEL}","max_tokens":1,"messages":{messages}}}"#),
    )
}

fn bare(name: &str, method: &'static str, path: &str) -> Case {
    Case {
        headers: Vec::new(),
        ..case(name, method, path, Body::Bytes(Vec::new()))
    }
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
        // Malformed bodies.
        json("truncated json", "/v1/chat/completions", r#"{"model":"#),
        json("not json", "/v1/chat/completions", "hello there"),
        json("json array body", "/v1/chat/completions", "[1,2,3]"),
        json("json null body", "/v1/chat/completions", "null"),
        json("empty object", "/v1/chat/completions", "{}"),
        json("empty body", "/v1/chat/completions", ""),
        json("trailing garbage", "/v1/chat/completions", &format!(
            r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}]}} xyz"#
        )),
        json("deeply nested json", "/v1/chat/completions", &"[".repeat(100_000)),
        json("nested json in messages", "/v1/chat/completions", &format!(
            r#"{{"model":"{CHAT_MODEL}","messages":{}"#,
            "[".repeat(50_000)
        )),
        json("number with 10000 digits", "/v1/chat/completions", &format!(
            r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":1{}}}"#,
            "0".repeat(10_000)
        )),
        Case {
            headers: vec![("Content-Type".into(), "text/plain".into())],
            lenient: true,
            ..chat("wrong content type", r#""user":"x""#)
        },
        Case {
            headers: Vec::new(),
            lenient: true,
            ..chat("no content type", r#""user":"x""#)
        },
        case(
            "invalid utf-8 in a string",
            "POST",
            "/v1/chat/completions",
            Body::Bytes(
                [
                    format!(r#"{{"model":"{CHAT_MODEL}","max_tokens":1,"messages":[{{"role":"user","content":""#)
                        .into_bytes(),
                    vec![0xff, 0xfe, 0xc3, 0x28, 0xed, 0xa0, 0x80],
                    br#""}]}"#.to_vec(),
                ]
                .concat(),
            ),
        ),
        case(
            "invalid utf-8 as a key",
            "POST",
            "/v1/embeddings",
            Body::Bytes(b"{\"\xff\xff\":1,\"input\":\"x\"}".to_vec()),
        ),
        json("lone surrogate escape", "/v1/chat/completions", &format!(
            r#"{{"model":"{CHAT_MODEL}","max_tokens":1,"messages":[{{"role":"user","content":"\ud800"}}]}}"#
        )),
        // Wrong types.
        json("model is a number", "/v1/chat/completions",
            r#"{"model":42,"messages":[{"role":"user","content":"hi"}]}"#),
        json("model missing", "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#),
        chat_messages("messages is a string", r#""hi""#),
        chat_messages("messages is null", "null"),
        chat_messages("messages is an object", r#"{"role":"user","content":"hi"}"#),
        chat_messages("content is a number", r#"[{"role":"user","content":42}]"#),
        chat_messages("role is unknown", r#"[{"role":"wizard","content":"hi"}]"#),

        chat_messages("role missing", r#"[{"content":"hi"}]"#),
        chat_messages("user content missing", r#"[{"role":"user"}]"#),

        chat_messages("image content part", r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]"#),
        chat_messages("tool message without id", r#"[{"role":"user","content":"hi"},{"role":"tool","content":"x"}]"#),

        chat("max_tokens is a string", r#""max_completion_tokens":"ten""#),
        chat("stream is a string", r#""stream":"yes""#),
        chat("temperature is a string", r#""temperature":"hot""#),
        chat("stop is a number", r#""stop":5"#),
        chat("user is an object", r#""user":{"a":1}"#),
        chat("seed is a string", r#""seed":"abc""#),
        chat("seed is a float", r#""seed":1.5"#),
        // Hostile numbers.
        chat("n huge", r#""n":1000000"#),
        chat("n zero", r#""n":0"#),
        chat("n negative", r#""n":-1"#),
        chat("n beyond u64", r#""n":18446744073709551616"#),
        chat_bare("max_tokens huge", r#""max_tokens":1000000000000"#),
        chat_bare("max_tokens beyond u64", r#""max_tokens":99999999999999999999999"#),
        chat_bare("max_tokens negative", r#""max_tokens":-1"#),
        chat_bare("max_tokens zero", r#""max_tokens":0"#),
        chat_bare("max_tokens float", r#""max_tokens":1.5"#),
        chat_bare("max_completion_tokens negative", r#""max_completion_tokens":-5"#),
        chat("temperature NaN literal", r#""temperature":NaN"#),
        chat("temperature NaN string", r#""temperature":"NaN""#),
        chat("temperature negative", r#""temperature":-1"#),
        chat("temperature 1e309", r#""temperature":1e309"#),
        chat("temperature Infinity", r#""temperature":Infinity"#),
        chat("temperature above 2", r#""temperature":2.5"#),
        chat("top_p above 1", r#""top_p":1.5"#),
        chat("top_p negative", r#""top_p":-0.1"#),
        chat("presence_penalty above 2", r#""presence_penalty":5"#),
        chat("frequency_penalty below -2", r#""frequency_penalty":-3"#),
        chat("logit_bias above 100", r#""logit_bias":{"1":500}"#),
        chat("logit_bias below -100", r#""logit_bias":{"1":-101}"#),
        chat("logit_bias non-numeric key", r#""logit_bias":{"abc":1}"#),
        chat("logit_bias token out of vocab", r#""logit_bias":{"99999999":1}"#),
        chat("top_logprobs above 20", r#""logprobs":true,"top_logprobs":100"#),
        chat("top_logprobs negative", r#""logprobs":true,"top_logprobs":-1"#),
        // Empty messages.
        chat_messages("messages empty", "[]"),
        // Tools and structured output that cannot be honoured.
        chat("tool without function", r#""tools":[{"type":"function"}]"#),
        chat("tool of unknown type", r#""tools":[{"type":"retrieval","function":{"name":"f"}}]"#),
        chat("tool_choice unknown word", r#""tool_choice":"sometimes""#),
        chat("tool_choice required without tools", r#""tool_choice":"required""#),
        chat(
            "tool_choice names a missing function",
            r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":{"type":"function","function":{"name":"g"}}"#,
        ),
        chat("response_format unknown type", r#""response_format":{"type":"xml"}"#),
        chat("json_schema missing", r#""response_format":{"type":"json_schema"}"#),
        chat(
            "json_schema invalid schema",
            r#""response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":12}}}"#,
        ),
        chat("stream_options without stream", r#""stream_options":{"include_usage":"yes"}"#),
        // Unknown model.
        json("unknown model", "/v1/chat/completions",
            r#"{"model":"no-such-model","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#),
        json("empty model name", "/v1/chat/completions",
            r#"{"model":"","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#),
        // Completions.
        json("completions without prompt", "/v1/completions",
            &format!(r#"{{"model":"{CHAT_MODEL}","max_tokens":1}}"#)),
        json("completions prompt is an object", "/v1/completions",
            &format!(r#"{{"model":"{CHAT_MODEL}","prompt":{{"a":1}},"max_tokens":1}}"#)),
        json("completions max_tokens negative", "/v1/completions",
            &format!(r#"{{"model":"{CHAT_MODEL}","prompt":"hi","max_tokens":-3}}"#)),
        json("completions temperature negative", "/v1/completions",
            &format!(r#"{{"model":"{CHAT_MODEL}","prompt":"hi","max_tokens":1,"temperature":-1}}"#)),
        // Embeddings.
        json("embeddings without input", "/v1/embeddings",
            &format!(r#"{{"model":"{EMBEDDING_MODEL}"}}"#)),
        json("embeddings empty input list", "/v1/embeddings",
            &format!(r#"{{"model":"{EMBEDDING_MODEL}","input":[]}}"#)),
        json("embeddings input is an object", "/v1/embeddings",
            &format!(r#"{{"model":"{EMBEDDING_MODEL}","input":{{"a":1}}}}"#)),
        json("embeddings unknown encoding", "/v1/embeddings",
            &format!(r#"{{"model":"{EMBEDDING_MODEL}","input":"x","encoding_format":"hex"}}"#)),
        json("embeddings unknown model", "/v1/embeddings",
            r#"{"model":"no-such-model","input":"x"}"#),
        json("embeddings too many inputs", "/v1/embeddings", &format!(
            r#"{{"model":"{EMBEDDING_MODEL}","input":[{}"a"]}}"#,
            r#""a","#.repeat(100_000)
        )),
        // Retrieval.
        json("retrieve empty object", "/v1/retrieve", "{}"),
        json("retrieve query is a number", "/v1/retrieve", r#"{"query":5}"#),
        json("retrieve malformed", "/v1/retrieve", r#"{"query":"#),
        // Unknown routes and wrong methods.
        bare("unknown route", "GET", "/nope"),
        bare("unknown v1 route", "GET", "/v1/nope"),
        bare("unknown model route", "GET", "/v1/models/no-such-model/extra"),
        json("extra path segment", "/v1/chat/completions/extra", "{}"),
        bare("path traversal", "GET", "/ui/../../etc/passwd"),
        bare("encoded traversal", "GET", "/%2e%2e/%2e%2e/etc/passwd"),
        bare("GET chat completions", "GET", "/v1/chat/completions"),
        bare("DELETE models", "DELETE", "/v1/models"),
        bare("PUT embeddings", "PUT", "/v1/embeddings"),
        bare("POST health", "POST", "/health"),
        bare("POST ui", "POST", "/"),
        bare("PATCH metrics", "PATCH", "/metrics"),
        bare("very long path", "GET", &format!("/{}", "a".repeat(100_000))),
        // Huge bodies and headers.
        case("50 MB body with content-length", "POST", "/v1/chat/completions",
            Body::Huge { len: 50 << 20 }),
        case("50 MB chunked body", "POST", "/v1/chat/completions",
            Body::HugeChunked { len: 50 << 20 }),
        case("50 MB embeddings body", "POST", "/v1/embeddings", Body::Huge { len: 50 << 20 }),
        Case {
            headers: vec![("X-Filler".into(), "a".repeat(1 << 20))],
            ..bare("1 MiB header", "GET", "/v1/models")
        },
        Case {
            headers: (0..2000).map(|i| (format!("X-H{i}"), "v".into())).collect(),
            ..bare("2000 headers", "GET", "/v1/models")
        },
        Case {
            headers: vec![("Content-Length".into(), "18446744073709551616".into())],
            ..case("content-length overflow", "POST", "/v1/chat/completions", Body::Bytes(b"{}".to_vec()))
        },
        Case {
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("Transfer-Encoding".into(), "chunked".into()),
            ],
            ..case("bogus chunk size", "POST", "/v1/chat/completions",
                Body::Bytes(b"zzzz\r\n{}\r\n0\r\n\r\n".to_vec()))
        },
    ];
    // A prompt longer than the context, three times in a row.
    let long = "hello ".repeat(20_000);
    for i in 1..=3 {
        cases.push(chat_messages(
            &format!("prompt longer than the context #{i}"),
            &format!(r#"[{{"role":"user","content":"{long}"}}]"#),
        ));
    }
    cases.push(json(
        "completions prompt longer than the context",
        "/v1/completions",
        &format!(r#"{{"model":"{CHAT_MODEL}","prompt":"{long}","max_tokens":1}}"#),
    ));
    for case in &mut cases {
        if matches!(case.body, Body::Huge { .. } | Body::HugeChunked { .. }) {
            case.limit = UPLOAD;
        }
    }
    cases
}

/// Sends one request over a fresh connection and reads the status line. A reader thread
/// takes the answer while the body is still being written, so a server that refuses early is
/// seen as refusing (and not as a reset connection).
fn send(addr: &str, case: &Case) -> Answer {
    let start = Instant::now();
    let mut stream = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => {
            return Answer {
                status: None,
                elapsed: start.elapsed(),
                head: String::new(),
                error: Some(format!("connect: {e}")),
            };
        }
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let answered = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut stream = stream.try_clone().expect("the socket clones");
        let answered = Arc::clone(&answered);
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let mut at = None;
            let error = loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break None,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if at.is_none() && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            at = Some(start.elapsed());
                            answered.store(true, Ordering::SeqCst);
                            break None;
                        }
                        if buf.len() > 1 << 20 {
                            break Some("answer head larger than 1 MiB".to_string());
                        }
                    }
                    Err(e) => break Some(format!("read: {e}")),
                }
            };
            answered.store(true, Ordering::SeqCst);
            (buf, at.unwrap_or_else(|| start.elapsed()), error)
        })
    };

    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n",
        case.method, case.path
    );
    let mut has_length = false;
    for (k, v) in &case.headers {
        has_length |=
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding");
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let write_result = (|| -> std::io::Result<()> {
        match &case.body {
            Body::Bytes(bytes) => {
                if !has_length {
                    head.push_str(&format!("Content-Length: {}\r\n", bytes.len()));
                }
                head.push_str("\r\n");
                stream.write_all(head.as_bytes())?;
                stream.write_all(bytes)?;
            }
            Body::Huge { len } => {
                head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
                stream.write_all(head.as_bytes())?;
                let filler = filler();
                let mut sent = 0;
                while sent < *len && !answered.load(Ordering::SeqCst) {
                    let n = filler.len().min(len - sent);
                    stream.write_all(&filler[..n])?;
                    sent += n;
                }
            }
            Body::HugeChunked { len } => {
                head.push_str("Transfer-Encoding: chunked\r\n\r\n");
                stream.write_all(head.as_bytes())?;
                let filler = filler();
                let mut sent = 0;
                while sent < *len && !answered.load(Ordering::SeqCst) {
                    let n = filler.len().min(len - sent);
                    stream.write_all(format!("{n:x}\r\n").as_bytes())?;
                    stream.write_all(&filler[..n])?;
                    stream.write_all(b"\r\n")?;
                    sent += n;
                }
                if sent >= *len {
                    stream.write_all(b"0\r\n\r\n")?;
                }
            }
        }
        stream.flush()
    })();
    let (buf, elapsed, read_error) = reader.join().expect("the reader thread does not panic");
    let _ = stream.shutdown(Shutdown::Both);
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok());
    let error = match (status, read_error, write_result) {
        (Some(_), _, _) => None,
        (None, Some(e), _) => Some(e),
        (None, None, Err(e)) => Some(format!("write: {e}")),
        (None, None, Ok(())) => Some("the connection closed without an answer".to_string()),
    };
    Answer {
        status,
        elapsed,
        head,
        error,
    }
}

fn filler() -> Vec<u8> {
    let mut v = br#"{"model":"x","messages":[{"role":"user","content":""#.to_vec();
    v.resize(64 * 1024, b'a');
    v
}

/// `GET /health` answers 200.
fn health(client: &reqwest::blocking::Client, node: &Node) -> Result<(), String> {
    let response = client
        .get(format!("{}/health", node.url))
        .timeout(Duration::from_secs(5))
        .send()
        .map_err(|e| format!("/health failed: {e}"))?;
    if response.status().as_u16() == 200 {
        Ok(())
    } else {
        Err(format!("/health answered {}", response.status()))
    }
}

/// A small valid chat request succeeds.
fn valid_chat(client: &reqwest::blocking::Client, node: &Node) -> Result<(), String> {
    let body = serde_json::json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 2,
        "temperature": 0,
    });
    let response = client
        .post(format!("{}/v1/chat/completions", node.url))
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .map_err(|e| format!("a valid chat request failed: {e}"))?;
    let status = response.status().as_u16();
    let text = response.text().unwrap_or_default();
    if status != 200 {
        return Err(format!("a valid chat request answered {status}: {text}"));
    }
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("a valid chat answer is not JSON ({e}): {text}"))?;
    if value["choices"][0]["message"].is_object() {
        Ok(())
    } else {
        Err(format!(
            "a valid chat answer has no choices[0].message: {text}"
        ))
    }
}

#[test]
fn every_bad_request_gets_a_quick_4xx_and_the_node_keeps_serving() {
    let mut node = Node::start(&[]);
    let client = reqwest::blocking::Client::new();
    health(&client, &node).expect("the node is healthy before the battery");
    valid_chat(&client, &node).expect("a valid request works before the battery");

    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut lenient = Vec::new();
    for case in cases() {
        let answer = send(&node.addr, &case);
        let status = answer.status.map_or("none".to_string(), |s| s.to_string());
        report.push(format!(
            "{:<45} {} {:<48} -> {status} in {:?}",
            case.name,
            case.method,
            truncate(&case.path, 48),
            answer.elapsed
        ));
        match answer.status {
            Some(s) if (400..500).contains(&s) => {}
            Some(s) if case.lenient && (200..300).contains(&s) => {
                lenient.push(format!("{} -> {s}", case.name));
            }
            Some(s) => failures.push(format!(
                "{} ({} {}): expected a 4xx, got {s}; head:\n{}",
                case.name,
                case.method,
                truncate(&case.path, 60),
                truncate(&answer.head, 600)
            )),
            None => failures.push(format!(
                "{} ({} {}): no HTTP answer ({})",
                case.name,
                case.method,
                truncate(&case.path, 60),
                answer.error.as_deref().unwrap_or("?")
            )),
        }
        if answer.elapsed > case.limit {
            failures.push(format!(
                "{}: answered in {:?}, more than {:?}",
                case.name, answer.elapsed, case.limit
            ));
        }
        if !node.is_running() {
            failures.push(format!("{}: the node process died", case.name));
            break;
        }
        if let Err(e) = health(&client, &node) {
            failures.push(format!("after {}: {e}", case.name));
        }
        if let Err(e) = valid_chat(&client, &node) {
            failures.push(format!("after {}: {e}", case.name));
        }
    }
    println!("{}", report.join("\n"));
    if !lenient.is_empty() {
        println!("accepted leniently (2xx, not 4xx): {}", lenient.join("; "));
    }
    assert!(
        failures.is_empty(),
        "{} problem(s) in the bad-input battery:\n{}\n\nall answers:\n{}\n\nnode stderr (tail):\n{}",
        failures.len(),
        failures.join("\n"),
        report.join("\n"),
        node.stderr()
    );
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
