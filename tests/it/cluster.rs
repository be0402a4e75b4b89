//! A domain of real `gaia` processes on loopback: three serving nodes and a gateway without
//! models, joined by topic through an open domain's manifest. Requests sent to the gateway
//! are spread over the serving nodes (each response names its node), and when the node that
//! streams a request is killed with SIGKILL in the middle of a run of 100 requests, that
//! request and every other one still complete (failover before the first token, resume
//! mid-stream) and the gateway counts the failover. A chat's later turns stay with the node
//! that served its first (prefix affinity).

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{client, info, init_address};
use gaia_tests::{
    CHAT_MODEL, Node, gaia, join_args, link_models, models_dir, open_domain, routable, text,
};
use serde_json::{Value, json};

/// Heartbeat of the test domain: a killed node leaves the member tables within 3 s.
const HEARTBEAT_MS: &str = "1000";

/// Waits until `gateway` sees exactly `serving` as its routable members.
fn wait_for_members(client: &reqwest::blocking::Client, gateway: &Node, serving: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let info = info(client, gateway);
        let routable = routable(&info);
        let mut want: Vec<String> = serving.iter().map(|s| s.to_string()).collect();
        want.sort();
        if routable == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway's routable members are {routable:?}, expected {want:?}; its info: \
             {info:#}\nits stderr:\n{}",
            gateway.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A non-streaming chat through `node`; panics unless it succeeds.
fn post(client: &reqwest::blocking::Client, node: &Node, body: Value) -> Value {
    let response = client
        .post(format!("{}/v1/chat/completions", node.url))
        .json(&body)
        .send()
        .unwrap_or_else(|e| panic!("POST to {}: {e}", node.url));
    let status = response.status();
    let text = response.text().unwrap_or_default();
    assert!(status.is_success(), "HTTP {status}: {text}\nbody: {body}");
    serde_json::from_str(&text).expect("a JSON body")
}

/// The outcome of one chat request through the gateway.
#[derive(Debug)]
struct Answer {
    node: String,
    text: String,
}

/// One chat completion through `url`, streamed or not; panics on any failure.
fn ask(client: &reqwest::blocking::Client, url: &str, i: usize, stream: bool) -> Answer {
    let body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": format!("Count from {i} to {}.", i + 5)}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": stream,
    });
    let (response, header) = crate::post_chat(client, url, &body, &format!("request {i}"));
    let raw = response.text().unwrap_or_default();
    if !stream {
        let value: Value = serde_json::from_str(&raw).expect("a JSON body");
        let text = value["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let node = value["served_by"]
            .as_str()
            .unwrap_or_else(|| panic!("request {i}: no served_by field: {value}"))
            .to_string();
        return Answer { node, text };
    }
    let mut text = String::new();
    let mut done = false;
    let mut finished = false;
    for line in raw.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("a JSON chunk");
        assert!(chunk.get("error").is_none(), "request {i}: {chunk}");
        if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(delta);
        }
        finished |= chunk["choices"][0]["finish_reason"].is_string();
    }
    assert!(
        done && finished,
        "request {i}: the stream did not finish: {raw}"
    );
    Answer { node: header, text }
}

/// Runs requests `range` on `threads` threads; `on_done` sees the count after each answer.
fn run(
    url: &str,
    count: usize,
    threads: usize,
    on_done: impl Fn(usize) + Send + Sync,
) -> Vec<Answer> {
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let client = client();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        return;
                    }
                    let answer = ask(&client, url, i, i % 2 == 1);
                    answers.lock().expect("not poisoned").push(answer);
                    on_done(finished.fetch_add(1, Ordering::SeqCst) + 1);
                }
            });
        }
    });
    answers.into_inner().expect("not poisoned")
}

fn served_counts(answers: &[Answer]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for a in answers {
        *counts.entry(a.node.clone()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn a_gateway_spreads_requests_and_survives_a_killed_node() {
    let models = models_dir();
    let env = [("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS)];

    // The operator's node creates an open domain; its manifest is handed to every member.
    let (operator, _shared, manifest) = open_domain("cluster");
    link_models(&models, operator.path());

    let first = Node::launch(operator, &["--domain", &manifest, "--p2p-port", "0"], &env);
    let boot = first.loopback_p2p();
    let member = || {
        let dir = tempfile::tempdir().expect("a data directory");
        link_models(&models, dir.path());
        Node::launch(dir, &join_args(&manifest, &boot), &env)
    };
    let second = member();
    let third = member();
    let gateway = Node::launch(
        tempfile::tempdir().expect("a data directory"),
        &[
            "--gateway",
            "--domain",
            &manifest,
            "--p2p-port",
            "0",
            "--bootstrap",
            &boot,
        ],
        &env,
    );

    let client = client();
    let gateway_info = info(&client, &gateway);
    assert_eq!(gateway_info["gateway"], json!(true), "{gateway_info}");
    let addresses: Vec<String> = [&first, &second, &third]
        .iter()
        .map(|n| {
            info(&client, n)["address"]
                .as_str()
                .expect("a serving node has an address")
                .to_string()
        })
        .collect();
    let serving: Vec<&str> = addresses.iter().map(String::as_str).collect();
    wait_for_members(&client, &gateway, &serving);

    // The gateway lists the model its domain serves.
    let models: Value = client
        .get(format!("{}/v1/models", gateway.url))
        .send()
        .and_then(|r| r.json())
        .expect("the gateway's models");
    assert_eq!(models["data"][0]["id"], json!(CHAT_MODEL), "{models}");

    // A gateway has no models of its own: embeddings are refused with a clear error.
    let refused = client
        .post(format!("{}/v1/embeddings", gateway.url))
        .json(&json!({"model": "all-minilm-l6-v2", "input": "hello"}))
        .send()
        .expect("the gateway answers");
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.text().unwrap_or_default().contains("gateway"));

    // Spread: 30 requests, 3 at a time; every serving node gets some.
    let answers = run(&gateway.url, 30, 3, |_| {});
    let counts = served_counts(&answers);
    for address in &addresses {
        assert!(
            counts.get(address).copied().unwrap_or(0) > 0,
            "node {address} served nothing: {counts:?}"
        );
    }
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
    assert!(answers.iter().all(|a| !a.text.is_empty()), "{answers:?}");

    // Structured output and required tool calls are served over the relay too.
    let schema = json!({"type": "object", "additionalProperties": false, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 24}}});
    let value = post(
        &client,
        &gateway,
        json!({"model": "default", "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a city, as JSON."}],
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "city", "schema": schema}}}),
    );
    let content = value["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let parsed: Value = serde_json::from_str(content)
        .unwrap_or_else(|e| panic!("the relayed json_schema answer is not JSON ({e}): {value}"));
    assert!(parsed["city"].is_string(), "{value}");
    assert!(
        addresses.iter().any(|a| value["served_by"] == json!(a)),
        "{value}"
    );
    let value = post(
        &client,
        &gateway,
        json!({"model": "default", "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "description": "Current weather of a city",
                "parameters": {"type": "object", "required": ["city"],
                    "additionalProperties": false,
                    "properties": {"city": {"type": "string", "maxLength": 24}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false}),
    );
    let choice = &value["choices"][0];
    assert_eq!(choice["finish_reason"], json!("tool_calls"), "{value}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], json!("get_weather"), "{value}");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap_or(""))
        .unwrap_or_else(|e| {
            panic!("the relayed tool call's arguments are not JSON ({e}): {value}")
        });
    assert!(arguments["city"].is_string(), "{value}");

    // Prefix affinity: a chat's later turns go to the node that served its first, which
    // reuses the history from its prefix cache, while different chats still spread.
    let nodes = [first, second, third];
    let conversations = chats_stay_with_their_node(&client, &gateway, &nodes, &addresses)
        + anthropic_through_the_gateway(&client, &gateway, &addresses)
        + relayed_answers_carry_sources(&client, &gateway, &addresses);

    // Metering: each serving node signed a receipt for every chat it finished and recorded
    // it; the gateway checked each one and recorded it before the chat ended for the client.
    assert_receipts(&client, &gateway, &nodes, &addresses, 32 + conversations);

    // Failover, asserted: while 100 requests run 4 at a time, a long request is streamed
    // once 15 of them have completed, and the node that streams its first token is killed
    // (SIGKILL) at once. Both end tokens are suppressed, so that node cannot have finished
    // the request before it died: the request must resume on another node and finish, and
    // the gateway must count the failover.
    let failovers_before = counter(&metrics(&client, &gateway), "gaia_chat_failovers_total");
    let mut nodes = nodes;
    let completed = AtomicUsize::new(0);
    let (answers, long, victim) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            run(&gateway.url, 100, 4, |finished| {
                completed.store(finished, Ordering::SeqCst);
            })
        });
        let deadline = Instant::now() + Duration::from_secs(600);
        while completed.load(Ordering::SeqCst) < 15 && !load.is_finished() {
            assert!(
                Instant::now() < deadline,
                "15 requests did not complete within 10 minutes; the gateway's stderr:\n{}",
                gateway.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut long = LongStream::start(&client, &gateway.url);
        let victim = addresses
            .iter()
            .position(|a| *a == long.node)
            .unwrap_or_else(|| panic!("{} is not a serving node: {addresses:?}", long.node));
        nodes[victim].kill();
        let before_kill = long.text.len();
        long.finish();
        assert!(
            long.text.len() > before_kill,
            "no token arrived after the serving node was killed: {:?}",
            long.text
        );
        let answers = load.join().expect("the load threads do not panic");
        (answers, long, victim)
    });
    assert_eq!(answers.len(), 100, "every request completed");
    assert!(
        answers.iter().all(|a| !a.text.is_empty()),
        "every answer has text: {answers:?}"
    );
    let counts = served_counts(&answers);
    eprintln!(
        "killed serving node {} of 3 (1 is the bootstrap), {}, while it streamed the long \
         request; served during the kill run: {counts:?}",
        victim + 1,
        addresses[victim]
    );
    let survivors: Vec<&str> = (0..nodes.len())
        .filter(|&i| i != victim)
        .map(|i| addresses[i].as_str())
        .collect();
    for address in &survivors {
        assert!(
            counts.get(*address).copied().unwrap_or(0) > 0,
            "node {address} served nothing: {counts:?}"
        );
    }
    // The gateway routed all 133 chats (and the chats' turns) to peers, and counted the long
    // request's failover (and any other request the kill interrupted) once the requests had
    // ended.
    let metrics = metrics(&client, &gateway);
    assert_eq!(
        counter(&metrics, "gaia_chats_routed_peer_total"),
        133.0 + conversations as f64
    );
    assert_eq!(counter(&metrics, "gaia_chats_routed_local_total"), 0.0);
    let failovers = counter(&metrics, "gaia_chat_failovers_total") - failovers_before;
    eprintln!("failovers during the kill run: {failovers}");
    assert!(
        failovers >= 1.0,
        "the gateway counted no failover, though the node streaming a request was killed; \
         the request's text: {:?}\nthe gateway's stderr:\n{}",
        long.text,
        gateway.stderr()
    );

    // Every chat ended with a receipt the gateway accepted, the resumed one included (its
    // receipt counts what the second node generated); the survivors' ledgers agree.
    let alive: Vec<(&Node, &String)> = nodes
        .iter()
        .zip(&addresses)
        .filter(|(_, a)| *a != &addresses[victim])
        .collect();
    let gateway_metering = info(&client, &gateway)["swarm"]["metering"].clone();
    assert_eq!(
        gateway_metering["receipts_accepted"],
        json!(133 + conversations),
        "{gateway_metering}"
    );
    for (node, address) in alive {
        assert_ledgers_agree(&client, &gateway_metering, node, address);
    }

    // The dead node leaves the gateway's member table (three heartbeats of silence).
    wait_for_members(&client, &gateway, &survivors);

    // The killed node's ledger survived SIGKILL: reopened, it holds every receipt the gateway
    // accepted from it, and at most the few it recorded but died before delivering.
    let accepted = gateway_metering["owed_by_clients"][&addresses[victim]]["receipts"]
        .as_u64()
        .unwrap_or(0);
    let killed = nodes
        .into_iter()
        .nth(victim)
        .expect("the victim is one of the nodes");
    let restarted = Node::launch(
        killed.stop_keep_data(),
        &["--domain", &manifest, "--p2p-port", "0"],
        &env,
    );
    let earned = info(&client, &restarted)["swarm"]["metering"]["earned"].clone();
    let recorded = earned["receipts"].as_u64().unwrap_or(0);
    assert!(
        (accepted..=accepted + 5).contains(&recorded) && accepted > 0,
        "the gateway accepted {accepted} receipts from the killed node; its reopened ledger \
         holds {earned}"
    );
}

/// Anthropic's Messages API through the gateway: the request is routed to a member like a
/// chat completion, whole and streamed. Returns the number of requests sent.
fn anthropic_through_the_gateway(
    client: &reqwest::blocking::Client,
    gateway: &Node,
    addresses: &[String],
) -> u64 {
    let body = json!({"model": "default", "max_tokens": 8, "system": "Be brief.",
        "messages": [{"role": "user", "content": "Name a colour."}]});
    let r = client
        .post(format!("{}/v1/messages", gateway.url))
        .json(&body)
        .send()
        .expect("the gateway answers");
    assert_eq!(r.status().as_u16(), 200);
    let m: Value = r.json().unwrap();
    let served = m["served_by"].as_str().unwrap_or_default().to_string();
    assert!(addresses.contains(&served), "served by {served:?}: {m}");
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["content"][0]["type"], "text", "{m}");
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 0, "{m}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = client
        .post(format!("{}/v1/messages", gateway.url))
        .json(&streamed)
        .send()
        .expect("the gateway answers")
        .text()
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{text}");
    assert_eq!(events.last(), Some(&"message_stop"), "{text}");
    assert!(events.contains(&"content_block_delta"), "{text}");
    2
}

/// A question the members' demo knowledge base answers, through the gateway: the serving
/// node retrieves, and its passages come back in `sources`, whole and streamed (stream
/// protocol 3). Returns the number of requests sent.
fn relayed_answers_carry_sources(
    client: &reqwest::blocking::Client,
    gateway: &Node,
    addresses: &[String],
) -> u64 {
    let body = json!({"model": "default", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "What is Gaia?"}]});
    let value = post(client, gateway, body.clone());
    assert!(
        addresses.iter().any(|a| value["served_by"] == json!(a)),
        "{value}"
    );
    let sources = value["sources"].as_array().cloned().unwrap_or_default();
    assert!(
        !sources.is_empty(),
        "a relayed RAG answer without sources: {value}"
    );
    for s in &sources {
        assert!(
            s["source"].is_string() && s["score"].is_number() && s["text"].is_string(),
            "{s}"
        );
    }
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let text = client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .json(&streamed)
        .send()
        .expect("the gateway answers")
        .text()
        .unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let with_sources: Vec<&Value> = chunks
        .iter()
        .filter(|c| c.get("sources").is_some())
        .collect();
    assert_eq!(with_sources.len(), 1, "{text}");
    assert_eq!(with_sources[0]["sources"], json!(sources), "{text}");
    2
}

/// Runs six three-turn chats through `gateway`, one turn at a time; checks that each chat's
/// turns were served by one node, that the chats were spread over more than one node, and
/// that the serving nodes' prefix caches took the history of the later turns. Returns the
/// number of requests sent.
fn chats_stay_with_their_node(
    client: &reqwest::blocking::Client,
    gateway: &Node,
    nodes: &[Node],
    addresses: &[String],
) -> u64 {
    let reused = |nodes: &[Node]| -> f64 {
        nodes
            .iter()
            .map(|n| counter(&metrics(client, n), "gaia_prefix_cache_reused_tokens_total"))
            .sum()
    };
    let reused_before = reused(nodes);
    let mut first_nodes = Vec::new();
    let mut history_tokens = 0.0;
    // The serving nodes' reuse as the relayed answers report it (stream protocol 3).
    let mut cached_reported = 0.0;
    for chat in 0..6 {
        let mut messages =
            vec![json!({"role": "system", "content": "You are a patient teacher of arithmetic."})];
        let mut served = Vec::new();
        for turn in 0..3 {
            messages.push(json!({"role": "user",
                "content": format!("Chat {chat}, turn {turn}: what is {} plus {}?", chat + 2, turn + 3)}));
            let value = post(
                client,
                gateway,
                json!({"model": "default", "max_tokens": 12, "temperature": 0,
                    "messages": messages}),
            );
            let answer = value["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if turn > 0 {
                history_tokens += value["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0) - 20.0;
            }
            cached_reported += value["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_f64()
                .unwrap_or(0.0);
            served.push(value["served_by"].as_str().unwrap_or_default().to_string());
            messages.push(json!({"role": "assistant", "content": answer}));
        }
        assert!(
            served.iter().all(|n| *n == served[0]) && addresses.contains(&served[0]),
            "chat {chat}'s turns were served by {served:?}"
        );
        first_nodes.push(served[0].clone());
    }
    first_nodes.sort();
    first_nodes.dedup();
    assert!(
        first_nodes.len() > 1,
        "six chats all went to {first_nodes:?}"
    );
    // Turns 2 and 3 of each chat reuse its history: most of their prompt tokens.
    let reused = reused(nodes) - reused_before;
    eprintln!(
        "prefix affinity: the caches reused {reused} tokens of about {history_tokens} of history"
    );
    assert!(
        reused >= 0.8 * history_tokens,
        "the prefix caches reused {reused} tokens of about {history_tokens} of history"
    );
    // The relayed usage says so too: the gateway's answers carry the serving nodes' counts
    // (the first turns reuse at most a cached system prompt).
    assert!(
        cached_reported >= 0.8 * history_tokens && cached_reported <= reused,
        "the relayed answers report {cached_reported} cached tokens; the nodes reused {reused} \
         of about {history_tokens} tokens of history"
    );
    18
}

/// Checks that `gateway` accepted `chats` receipts and refused or missed none, and that each
/// serving node's ledger of issued receipts matches what the gateway recorded for it.
fn assert_receipts(
    client: &reqwest::blocking::Client,
    gateway: &Node,
    nodes: &[Node],
    addresses: &[String],
    chats: u64,
) {
    let metering = info(client, gateway)["swarm"]["metering"].clone();
    assert_eq!(metering["receipts_accepted"], json!(chats), "{metering}");
    assert_eq!(metering["receipts_refused"], json!(0), "{metering}");
    assert_eq!(metering["receipts_missing"], json!(0), "{metering}");
    let mut receipts = 0;
    for (node, address) in nodes.iter().zip(addresses) {
        receipts += assert_ledgers_agree(client, &metering, node, address);
    }
    assert_eq!(receipts, chats, "{metering}");
}

/// Checks that what `gateway_metering` recorded for the node at `address` is what the node
/// recorded itself; returns its receipts.
fn assert_ledgers_agree(
    client: &reqwest::blocking::Client,
    gateway_metering: &Value,
    node: &Node,
    address: &str,
) -> u64 {
    let owed = &gateway_metering["owed_by_clients"][address];
    let earned = info(client, node)["swarm"]["metering"]["earned"].clone();
    for field in ["receipts", "prompt_tokens", "completion_tokens", "amount"] {
        assert_eq!(
            owed[field], earned[field],
            "{field} of {address}: the gateway's ledger {owed}, the node's {earned}"
        );
    }
    let receipts = earned["receipts"].as_u64().unwrap_or(0);
    if receipts > 0 {
        assert!(
            earned["completion_tokens"].as_u64().unwrap_or(0) > 0,
            "{address}: {earned}"
        );
    }
    receipts
}

/// The most tokens of the long request: a few seconds of generation at least, while the kill
/// follows its first token within milliseconds.
const LONG_TOKENS: u64 = 300;

/// A streamed chat completion that runs to [`LONG_TOKENS`] (the logit bias suppresses both
/// end tokens of SmolLM2).
struct LongStream {
    lines: std::io::Lines<BufReader<reqwest::blocking::Response>>,
    /// The node that streamed its first token (the `x-gaia-node` header).
    node: String,
    /// The text received so far.
    text: String,
    /// Whether `[DONE]` arrived.
    done: bool,
    /// Whether a chunk carried a finish reason.
    finished: bool,
}

impl LongStream {
    /// Sends the request through `url` and reads until its first token.
    fn start(client: &reqwest::blocking::Client, url: &str) -> LongStream {
        let body = json!({
            "model": "default",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": LONG_TOKENS,
            "temperature": 0,
            "logit_bias": {"0": -100, "2": -100},
            "stream": true,
        });
        let (response, node) = crate::post_chat(client, url, &body, "the long request");
        let mut stream = LongStream {
            lines: BufReader::new(response).lines(),
            node,
            text: String::new(),
            done: false,
            finished: false,
        };
        while stream.text.is_empty() {
            assert!(
                stream.next_event(),
                "the long request's stream ended before its first token"
            );
        }
        stream
    }

    /// Reads one server-sent event; false at the end of the stream.
    fn next_event(&mut self) -> bool {
        for line in self.lines.by_ref() {
            let line = line.unwrap_or_else(|e| panic!("reading the long request's stream: {e}"));
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                self.done = true;
                return true;
            }
            let chunk: Value = serde_json::from_str(data).expect("a JSON chunk");
            assert!(chunk.get("error").is_none(), "the long request: {chunk}");
            if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str() {
                self.text.push_str(delta);
            }
            self.finished |= chunk["choices"][0]["finish_reason"].is_string();
            return true;
        }
        false
    }

    /// Reads the rest of the stream; panics unless it finishes.
    fn finish(&mut self) {
        while self.next_event() {}
        assert!(
            self.done && self.finished,
            "the long request's stream did not finish: {:?}",
            self.text
        );
    }
}

/// The Prometheus text of `node`'s `/metrics`.
fn metrics(client: &reqwest::blocking::Client, node: &Node) -> String {
    client
        .get(format!("{}/metrics", node.url))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_else(|e| panic!("GET /metrics of {}: {e}", node.url))
}

/// The value of the unlabelled series `name` in `metrics`.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{metrics}"))
}

#[test]
fn an_operator_revocation_reaches_the_running_domain() {
    let models = models_dir();
    let env = [("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS)];
    // The operator runs a gateway; one admitted member serves the model.
    let operator = tempfile::tempdir().expect("a data directory");
    let member_dir = tempfile::tempdir().expect("a data directory");
    link_models(&models, member_dir.path());
    let operator_address = init_address(operator.path());
    let member_address = init_address(member_dir.path());
    // The gateway sends requests, so it needs a certificate too.
    for args in [
        &["domain", "create", "private", "--policy", "allow"][..],
        &["domain", "admit", &member_address, "--domain", "private"][..],
        &["domain", "admit", &operator_address, "--domain", "private"][..],
    ] {
        let out = gaia(operator.path(), args);
        assert!(out.status.success(), "{}", text(&out));
    }
    // The member gets the manifest with its certificate next to it (certs/<address>.bin).
    let handed = tempfile::tempdir().expect("a directory for the member's files");
    std::fs::create_dir_all(handed.path().join("certs")).expect("a certs directory");
    let domain = operator.path().join("domains/private");
    std::fs::copy(
        domain.join("manifest.bin"),
        handed.path().join("manifest.bin"),
    )
    .expect("the manifest is copied");
    let cert = format!("certs/{member_address}.bin");
    std::fs::copy(domain.join(&cert), handed.path().join(&cert)).expect("the certificate");
    let operator_path = operator.path().to_path_buf();
    let gateway = Node::launch(
        operator,
        &["--gateway", "--domain", "private", "--p2p-port", "0"],
        &env,
    );
    let member_manifest = handed.path().join("manifest.bin");
    let member = Node::launch(
        member_dir,
        &[
            "--domain",
            &member_manifest.to_string_lossy(),
            "--p2p-port",
            "0",
            "--bootstrap",
            &gateway.loopback_p2p(),
        ],
        &env,
    );
    let client = client();
    wait_for_members(&client, &gateway, &[&member_address]);
    let answer = ask(&client, &gateway.url, 0, false);
    assert_eq!(answer.node, member_address);

    // `gaia domain revoke` on the operator's machine: its running node publishes the
    // revocation, and the member stops being routable.
    let out = gaia(
        &operator_path,
        &["domain", "revoke", &member_address, "--domain", "private"],
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_for_members(&client, &gateway, &[]);
    let refused = client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .json(&json!({"model": "default", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .expect("the gateway answers");
    assert_eq!(refused.status().as_u16(), 503, "{:?}", refused.text());
    drop(member);
}

/// The routable member addresses `node` lists in `/v1/info`, sorted.
fn routable_members(client: &reqwest::blocking::Client, node: &Node) -> Vec<String> {
    routable(&info(client, node))
}

/// Polls until `check` holds for every node of `nodes`; returns how long it took.
fn until_all(
    client: &reqwest::blocking::Client,
    nodes: &[&Node],
    what: &str,
    check: impl Fn(&[String]) -> bool,
) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let tables: Vec<Vec<String>> = nodes.iter().map(|n| routable_members(client, n)).collect();
        if tables.iter().all(|t| check(t)) {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the routable members are {tables:?}; stderr of the first node:\n{}",
            nodes[0].stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Hands a member the domain's files: the manifest and its certificate (`certs/<address>.bin`).
fn hand_files(domain: &std::path::Path, address: &str) -> tempfile::TempDir {
    let handed = tempfile::tempdir().expect("a directory for the member's files");
    std::fs::create_dir_all(handed.path().join("certs")).expect("a certs directory");
    std::fs::copy(
        domain.join("manifest.bin"),
        handed.path().join("manifest.bin"),
    )
    .expect("the manifest is copied");
    let cert = format!("certs/{address}.bin");
    std::fs::copy(domain.join(&cert), handed.path().join(&cert)).expect("the certificate");
    handed
}

fn start_member(data: tempfile::TempDir, files: &tempfile::TempDir, bootstrap: &str) -> Node {
    let manifest = files.path().join("manifest.bin");
    Node::launch(
        data,
        &[
            "--domain",
            &manifest.to_string_lossy(),
            "--p2p-port",
            "0",
            "--bootstrap",
            bootstrap,
        ],
        &[("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS)],
    )
}

/// A live allow-list domain: the operator admits a new node while the members run (the new
/// manifest version travels; nobody restarts), then goes offline; a revocation handed to one
/// member with `gaia domain revoke --to` reaches every member, and a member restarted
/// afterwards still refuses the revoked node (it kept the revocation) even when that node is
/// the only peer it can reach and hands it a manifest that admits it.
#[test]
fn a_live_domain_admits_and_revokes_without_restarts_or_its_operator() {
    let models = models_dir();
    let heartbeat = Duration::from_millis(HEARTBEAT_MS.parse().expect("a number"));
    let operator = tempfile::tempdir().expect("a data directory");
    let operator_address = init_address(operator.path());
    let mut dirs = Vec::new();
    let mut addresses = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("a data directory");
        link_models(&models, dir.path());
        addresses.push(init_address(dir.path()));
        dirs.push(dir);
    }
    let (a, b, c) = (&addresses[0], &addresses[1], &addresses[2]);
    for args in [
        &["domain", "create", "live", "--policy", "allow"][..],
        &["domain", "admit", a, "--domain", "live"][..],
        &["domain", "admit", b, "--domain", "live"][..],
        &["domain", "admit", &operator_address, "--domain", "live"][..],
    ] {
        let out = gaia(operator.path(), args);
        assert!(out.status.success(), "{}", text(&out));
    }
    let domain = operator.path().join("domains/live");
    let files_a = hand_files(&domain, a);
    let files_b = hand_files(&domain, b);
    let operator_path = operator.path().to_path_buf();
    let gateway = Node::launch(
        operator,
        &["--gateway", "--domain", "live", "--p2p-port", "0"],
        &[("GAIA_SWARM_HEARTBEAT_MS", HEARTBEAT_MS)],
    );
    let mut dirs = dirs.into_iter();
    let node_a = start_member(dirs.next().expect("a"), &files_a, &gateway.loopback_p2p());
    let node_b = start_member(dirs.next().expect("b"), &files_b, &node_a.loopback_p2p());
    let client = client();
    until_all(&client, &[&gateway], "a and b join", |t| t.len() == 2);
    until_all(
        &client,
        &[&node_a, &node_b],
        "a and b see each other",
        |t| t.len() == 1,
    );

    // Admission while the domain runs: a new manifest version and a certificate.
    let out = gaia(&operator_path, &["domain", "admit", c, "--domain", "live"]);
    assert!(out.status.success(), "{}", text(&out));
    let files_c = hand_files(&domain, c);
    let node_c = start_member(dirs.next().expect("c"), &files_c, &node_b.loopback_p2p());
    let admitted = until_all(
        &client,
        &[&gateway, &node_a, &node_b],
        "every member routes to the admitted node",
        |t| t.contains(c),
    );
    eprintln!(
        "admitted node routable by every member {:.1} s after it started ({:.1} heartbeats)",
        admitted.as_secs_f64(),
        admitted.as_secs_f64() / heartbeat.as_secs_f64()
    );

    // The operator goes offline, then revokes c through member a.
    let _operator_data = gateway.stop_keep_data();
    let out = gaia(
        &operator_path,
        &[
            "domain",
            "revoke",
            c,
            "--domain",
            "live",
            "--to",
            &node_a.loopback_p2p(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let revoked = until_all(
        &client,
        &[&node_a, &node_b],
        "every member stops routing to the revoked node",
        |t| !t.contains(c),
    );
    eprintln!(
        "revocation through one member reached every member in {:.1} s ({:.1} heartbeats)",
        revoked.as_secs_f64(),
        revoked.as_secs_f64() / heartbeat.as_secs_f64()
    );
    assert!(
        revoked <= heartbeat * 3 + Duration::from_secs(2),
        "the revocation took {revoked:?}, more than three heartbeats"
    );

    // b restarts from its old manifest file while a is gone too; c runs again without its
    // saved domain state, with the manifest that admits it, so it knows nothing of its
    // revocation, and it is the only peer b can reach. b kept the revocation and the newer
    // manifest: it still refuses c, and c learns of its revocation from b.
    let dead_bootstrap = node_a.loopback_p2p();
    drop(node_a);
    let b_data = node_b.stop_keep_data();
    let c_data = node_c.stop_keep_data();
    std::fs::remove_dir_all(c_data.path().join("domain-state"))
        .expect("c kept its domain state in domain-state/");
    let node_c = start_member(c_data, &files_c, &dead_bootstrap);
    let node_b = start_member(b_data, &files_b, &node_c.loopback_p2p());
    let c_version = info(&client, &node_c)["swarm"]["manifest_version"].clone();
    assert!(c_version.is_u64(), "{c_version}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c_info = info(&client, &node_c);
        if c_info["swarm"]["local_status"]
            .as_str()
            .is_some_and(|s| s.contains("Blocked"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c never learnt of its revocation from b: {c_info:#}\nb's stderr:\n{}",
            node_b.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b_info = info(&client, &node_b);
    assert_eq!(
        b_info["swarm"]["manifest_version"], c_version,
        "b kept the newer manifest across its restart: {b_info:#}"
    );
    let watch_until = Instant::now() + heartbeat * 4;
    while Instant::now() < watch_until {
        let table = routable_members(&client, &node_b);
        assert!(
            !table.contains(c),
            "the restarted member routes to the revoked node: {table:?}\n{}",
            node_b.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(node_b);
    drop(node_c);
}
