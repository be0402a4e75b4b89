//! The domain escrow on a real local EVM chain (ganache from protocol/contracts/node_modules,
//! which tests/run installs with `npm ci`): the real contract, deployed and driven by `gaia pay`
//! and by the node's chain client.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gaia_node::pay::{ChainError, Escrow};
use gaia_protocol::payment::{self, SignedVoucher, Voucher};
use gaia_protocol::{NodeId, SecretKey, keystore};
use gaia_tests::{CHAT_MODEL, Node, join_args, link_models, models_dir};
use gaia_tests::{gaia, text};
use serde_json::{Value, json};

const CHAIN_ID: u64 = 1337;
/// Every funded key starts with 1 000 ether.
const FUNDS: u128 = 1_000_000_000_000_000_000_000;

/// A ganache chain, killed on drop.
struct Chain {
    child: Child,
    url: String,
}

impl Chain {
    /// Starts ganache on a free port with `keys` funded.
    fn start(keys: &[&SecretKey]) -> Chain {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/contracts");
        let ganache = root.join("node_modules/.bin/ganache");
        assert!(
            ganache.exists(),
            "{} is missing: run `npm ci` in {} (tests/run does)",
            ganache.display(),
            root.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut command = Command::new(ganache);
        command.args([
            "--server.host",
            "127.0.0.1",
            "--server.port",
            &port.to_string(),
            "--chain.chainId",
            &CHAIN_ID.to_string(),
            "--logging.quiet",
        ]);
        for key in keys {
            command.arg("--wallet.accounts").arg(format!(
                "0x{},{FUNDS}",
                hex::encode(key.to_bytes().as_slice())
            ));
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ganache starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Listening on") {
                    let _ = tx.try_send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("ganache listens within a minute");
        Chain {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// One JSON-RPC call.
    fn rpc(&self, method: &str, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let answer: Value = reqwest::blocking::Client::new()
            .post(&self.url)
            .json(&body)
            .send()
            .and_then(reqwest::blocking::Response::json)
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// Moves the chain's clock forward and mines a block.
    fn advance(&self, seconds: u64) {
        self.rpc("evm_increaseTime", json!([seconds]));
        self.rpc("evm_mine", json!([]));
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A data directory with a node key (`gaia init --no-models`) and that key.
fn account() -> (tempfile::TempDir, SecretKey) {
    let dir = tempfile::tempdir().expect("a data directory");
    let out = gaia(dir.path(), &["init", "--no-models"]);
    assert!(out.status.success(), "{}", text(&out));
    let key = key_of(dir.path());
    (dir, key)
}

/// The node key of an initialised data directory.
fn key_of(dir: &Path) -> SecretKey {
    let json = std::fs::read_to_string(dir.join("node.key")).expect("node.key");
    let password = std::fs::read_to_string(dir.join("node.key.password")).expect("its password");
    keystore::decrypt(&json, password.trim_end().as_bytes()).expect("it decrypts")
}

/// Runs `gaia pay <args>` against `chain` from `dir`; returns stdout, panicking on failure.
fn pay(dir: &Path, chain: &Chain, args: &[&str]) -> String {
    let out = pay_result(dir, chain, args);
    assert!(out.status.success(), "gaia pay {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn pay_result(dir: &Path, chain: &Chain, args: &[&str]) -> std::process::Output {
    let mut all = vec!["pay"];
    all.extend_from_slice(args);
    gaia_tests::gaia_env(
        dir,
        &all,
        &[
            ("GAIA_PAY_RPC_URL", chain.url.as_str()),
            ("GAIA_PAY_CHAIN_ID", "1337"),
        ],
    )
}

/// The value after `label ` on its own line of `out`.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{label}` in:\n{out}"))
        .split_whitespace()
        .next()
        .unwrap_or_default()
}

/// The gas figures of `out` (`tx 0x… gas N (what)` lines).
fn gas(out: &str, what: &str) -> u64 {
    out.lines()
        .filter(|l| l.ends_with(&format!("({what})")))
        .find_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or_else(|| panic!("no gas figure for {what} in:\n{out}"))
}

/// A runtime and the escrow at `contract` reached with `key`, for reading the chain.
fn escrow_client(
    chain: &Chain,
    contract: &str,
    key: &SecretKey,
) -> (tokio::runtime::Runtime, Escrow) {
    let rt = runtime();
    let contract = contract.parse().expect("an address");
    let escrow = rt
        .block_on(Escrow::connect(&chain.url, CHAIN_ID, contract, key))
        .expect("connects");
    (rt, escrow)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn signed(
    escrow: &payment::Escrow,
    payer: &SecretKey,
    payee: NodeId,
    amount: u128,
) -> SignedVoucher {
    Voucher {
        payer: payer.node_id(),
        payee,
        // The channel of the payee's own entry node (as `gaia pay voucher` makes by default).
        entry: payee,
        cumulative_amount: amount,
        expires_at: 4_000_000_000,
    }
    .sign(escrow, payer)
    .expect("signs")
}

/// Deploy, admit three payees, deposit for a new access key, redeem cumulative vouchers, refuse
/// forged, replayed, over-balance and wrong-chain vouchers, withdraw, refund after expiry: every
/// wei deposited ends with a payee, the operator or the depositor.
#[test]
fn the_escrow_pays_nodes_from_deposits_and_conserves_every_wei() {
    let (operator_dir, operator) = account();
    let (user_dir, user) = account();
    let nodes: Vec<(tempfile::TempDir, SecretKey)> = (0..3).map(|_| account()).collect();
    let mut funded = vec![&operator, &user];
    funded.extend(nodes.iter().map(|(_, k)| k));
    let chain = Chain::start(&funded);

    // Deploy: a 10 % operator share, accounts open for an hour.
    let out = pay(
        operator_dir.path(),
        &chain,
        &["deploy", "--share-bps", "1000", "--lock-seconds", "3600"],
    );
    let contract = field(&out, "contract").to_string();
    assert_eq!(field(&out, "operator"), operator.node_id().to_string());
    let deploy_gas = gas(&out, "deploy");
    let on = ["--contract", contract.as_str()];

    for (_, node) in &nodes {
        let address = node.node_id().to_string();
        let mut args = vec!["payee", address.as_str()];
        args.extend_from_slice(&on);
        pay(operator_dir.path(), &chain, &args);
    }
    // Only the operator admits payees.
    let stranger = nodes[0].1.node_id().to_string();
    let mut args = vec!["payee", stranger.as_str()];
    args.extend_from_slice(&on);
    let refused = pay_result(user_dir.path(), &chain, &args);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("only the operator"),
        "{}",
        text(&refused)
    );

    // Deposit for a new access key.
    let deposit: u128 = 1_000_000;
    let mut args = vec!["deposit", "--amount", "1000000"];
    args.extend_from_slice(&on);
    let out = pay(user_dir.path(), &chain, &args);
    let api_key = field(&out, "api key").to_string();
    assert!(api_key.starts_with("gaia-sk-"), "{out}");
    let access = gaia_node::pay::parse_access_key(&api_key).expect("a valid access key");
    assert_eq!(field(&out, "account"), access.node_id().to_string());
    assert_eq!(field(&out, "balance"), "1000000");
    let deposit_gas = gas(&out, "deposit");
    let saved = field(&out, "saved").to_string();
    assert!(std::path::Path::new(&saved).starts_with(user_dir.path()));
    assert!(std::fs::read_to_string(&saved).unwrap().contains(&api_key));

    let rt = runtime();
    let contract_id: NodeId = contract.parse().expect("an address");
    let escrow = rt
        .block_on(Escrow::connect(
            &chain.url,
            CHAIN_ID,
            contract_id,
            &operator,
        ))
        .expect("connects");
    let domain = escrow.domain();

    // Our EIP-712 digest is the contract's.
    let probe = signed(&domain, &access, nodes[0].1.node_id(), 5);
    assert_eq!(
        rt.block_on(escrow.voucher_digest(&probe.voucher)).unwrap(),
        probe.voucher.digest(&domain)
    );

    // Cumulative vouchers through the CLI: node 0 is owed 100 000, then 250 000 in all; node 1
    // 300 000. Node 2 serves nothing.
    let dir = tempfile::tempdir().unwrap();
    let voucher_file = |name: &str, payee: &SecretKey, amount: u128| -> PathBuf {
        let path = dir.path().join(name);
        let out = pay(
            user_dir.path(),
            &chain,
            &[
                "voucher",
                "--access-key",
                &saved,
                "--payee",
                &payee.node_id().to_string(),
                "--cumulative",
                &amount.to_string(),
                "--contract",
                &contract,
                "--out",
                path.to_str().unwrap(),
            ],
        );
        assert!(out.contains("voucher"), "{out}");
        path
    };
    let v0a = voucher_file("v0a", &nodes[0].1, 100_000);
    let v0b = voucher_file("v0b", &nodes[0].1, 250_000);
    let v1 = voucher_file("v1", &nodes[1].1, 300_000);
    // Node 0 redeems its first, then its second voucher (it pays the difference); anyone may
    // submit node 1's.
    let redeem = |submitter: &Path, files: &[&PathBuf]| {
        let mut args: Vec<String> = vec!["redeem".into()];
        args.extend(files.iter().map(|f| f.to_string_lossy().to_string()));
        args.extend(on.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pay_result(submitter, &chain, &args)
    };
    let out = redeem(nodes[0].0.path(), &[&v0a, &v0b]);
    assert!(out.status.success(), "{}", text(&out));
    let redeem_gas = gas(&String::from_utf8_lossy(&out.stdout), "redeem");
    let out = redeem(user_dir.path(), &[&v1]);
    assert!(out.status.success(), "{}", text(&out));

    // A replay of a redeemed voucher: refused on chain, nothing paid twice.
    let out = redeem(nodes[0].0.path(), &[&v0a]);
    assert!(!out.status.success());
    assert!(text(&out).contains("replay"), "{}", text(&out));
    // Refused by the node before it reaches the chain: a voucher whose payer did not sign it,
    // one signed for another chain, and a file that is no voucher.
    let mut forged = signed(&domain, &access, nodes[2].1.node_id(), 10_000);
    forged.signature = signed(&domain, &nodes[2].1, nodes[2].1.node_id(), 10_000).signature;
    let other_chain = payment::Escrow {
        chain_id: 1,
        ..domain
    };
    let wrong_chain = signed(&other_chain, &access, nodes[2].1.node_id(), 10_000);
    for (what, voucher) in [("forged", forged), ("wrong chain", wrong_chain)] {
        let err = rt.block_on(escrow.redeem(&voucher)).expect_err(what);
        assert!(err.to_string().contains("not submitted"), "{what}: {err}");
        // And on chain, submitted anyway.
        let err = rt
            .block_on(escrow.submit_unchecked(&voucher))
            .expect_err(what);
        assert!(
            matches!(&err, ChainError::Refused(m) if m.contains("not signed by its payer")),
            "{what}: {err}"
        );
    }
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"\x01\x02not a voucher").unwrap();
    let out = redeem(nodes[2].0.path(), &[&garbage]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is not a voucher"), "{}", text(&out));
    // Over an account (entry nodes that together debited more than it held): refused on chain
    // as it is; its payee takes what the account holds, and the rest after a top-up. (The
    // client refused twice above still sends: a refused submission must not leave it a nonce
    // ahead of the chain.)
    let out = pay(
        user_dir.path(),
        &chain,
        &["deposit", "--amount", "100000", "--contract", &contract],
    );
    let small = gaia_node::pay::parse_access_key(field(&out, "api key")).expect("a key");
    let node2 = nodes[2].1.node_id();
    let over = signed(&domain, &small, node2, 150_000);
    let err = rt
        .block_on(escrow.redeem(&over))
        .expect_err("over the balance");
    assert!(
        err.to_string().contains("more than the account holds"),
        "{err}"
    );
    let err = rt
        .block_on(escrow.redeem_part(&over, 150_001))
        .expect_err("over the voucher");
    assert!(err.to_string().contains("above the voucher"), "{err}");
    rt.block_on(escrow.redeem_part(&over, 100_000))
        .expect("pays what is there");
    assert_eq!(
        rt.block_on(escrow.account(small.node_id()))
            .unwrap()
            .balance,
        0
    );
    assert_eq!(
        rt.block_on(escrow.redeemed(small.node_id(), node2, node2))
            .unwrap(),
        100_000
    );
    assert_eq!(rt.block_on(escrow.withdrawable(node2)).unwrap(), 90_000);
    let small_address = small.node_id().to_string();
    pay(
        user_dir.path(),
        &chain,
        &[
            "deposit",
            "--account",
            &small_address,
            "--amount",
            "50000",
            "--contract",
            &contract,
        ],
    );
    rt.block_on(escrow.redeem(&over))
        .expect("the rest, after a top-up");
    assert_eq!(rt.block_on(escrow.withdrawable(node2)).unwrap(), 135_000);
    let replay = rt.block_on(escrow.redeem(&over)).expect_err("a replay");
    assert!(replay.to_string().contains("replay"), "{replay}");

    // Payouts: 90 % to the nodes, 10 % to the operator.
    let account = rt.block_on(escrow.account(access.node_id())).unwrap();
    assert_eq!(account.balance, deposit - 550_000);
    for (i, owed) in [(0, 250_000u128), (1, 300_000)] {
        let node = nodes[i].1.node_id();
        assert_eq!(
            rt.block_on(escrow.redeemed(access.node_id(), node, node))
                .unwrap(),
            owed
        );
        assert_eq!(
            rt.block_on(escrow.withdrawable(node)).unwrap(),
            owed * 9 / 10
        );
    }
    assert_eq!(
        rt.block_on(escrow.withdrawable(operator.node_id()))
            .unwrap(),
        55_000 + 15_000
    );

    // Withdrawals and the refund move the money out; the contract ends empty.
    let mut withdrawn = 0u128;
    for who in [&nodes[0].0, &nodes[1].0, &nodes[2].0, &operator_dir] {
        let mut args = vec!["withdraw"];
        args.extend_from_slice(&on);
        let out = pay(who.path(), &chain, &args);
        withdrawn += field(&out, "withdrew").parse::<u128>().unwrap();
    }
    let account_text = access.node_id().to_string();
    let mut args = vec!["refund", account_text.as_str()];
    args.extend_from_slice(&on);
    let early = pay_result(user_dir.path(), &chain, &args);
    assert!(!early.status.success());
    assert!(text(&early).contains("open until"), "{}", text(&early));
    chain.advance(3601);
    let out = pay(user_dir.path(), &chain, &args);
    assert_eq!(field(&out, "refunded"), "450000");
    assert_eq!(
        withdrawn + 450_000,
        deposit + 150_000,
        "every wei is accounted for"
    );
    assert_eq!(rt.block_on(escrow.balance_of(contract_id)).unwrap(), 0);
    // After expiry a voucher no longer pays.
    let late = signed(&domain, &access, nodes[0].1.node_id(), 260_000);
    assert!(rt.block_on(escrow.redeem(&late)).is_err());

    eprintln!(
        "escrow gas: deploy {deploy_gas}, deposit {deposit_gas}, redeem {redeem_gas} (ganache 7.9.2)"
    );
}

/// A chain endpoint that answers nonsense gets a clear error, not a panic, and nothing is sent.
#[test]
fn a_malformed_chain_answer_is_a_clear_error() {
    let url = nonsense_chain();
    let key = SecretKey::generate();
    let err = runtime()
        .block_on(Escrow::connect(&url, CHAIN_ID, key.node_id(), &key))
        .err()
        .expect("nonsense is refused");
    assert!(matches!(err, ChainError::Rpc(_)), "{err}");
    let err = runtime()
        .block_on(Escrow::connect("not a url", CHAIN_ID, key.node_id(), &key))
        .err()
        .expect("a bad URL is refused");
    assert!(matches!(err, ChainError::BadUrl { .. }), "{err}");

    // A node whose chain answers nonsense serves no paid request: a clear 503, no generation.
    let contract = NodeId([0xec; 20]).to_string();
    let node = Node::start(&[
        ("GAIA_PAYMENTS_RPC_URL", url.as_str()),
        ("GAIA_PAYMENTS_CHAIN_ID", "1337"),
        ("GAIA_PAYMENTS_CONTRACT", contract.as_str()),
        ("GAIA_PAYMENTS_PRICE", "1000"),
    ]);
    let client = reqwest::blocking::Client::new();
    let access = gaia_node::pay::access_key_text(&SecretKey::generate());
    let (status, body, _) = paid_chat(&client, &node.url, Some(&access), 1, false);
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["error"]["code"],
        json!("payment_chain_unavailable"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("payment chain cannot be reached"),
        "{body}"
    );
    let (status, body) = get_json(&client, &format!("{}/v1/balance", node.url), &access);
    assert_eq!(status, 503, "{body}");
    // Nothing was generated.
    let metrics = client
        .get(format!("{}/metrics", node.url))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "gaia_completion_tokens_total 0"),
        "{metrics}"
    );
}

/// A JSON-RPC endpoint that answers every call with a result of the wrong shape.
fn nonsense_chain() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let body = r#"{"jsonrpc":"2.0","id":0,"result":{"not":"a chain id"}}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// The price per 1000 tokens of the serving node the gateway pays, and twice it, asked by a
/// member the gateway must never pay.
const PRICE: u128 = 1_000_000;

/// What `tokens` tokens cost at `price` per 1000 (rounded up, as receipts are).
fn cost(tokens: u128, price: u128) -> u128 {
    (tokens * price).div_ceil(1000)
}

/// One chat through `url` with `key` as bearer: the HTTP status, the body (for a streamed
/// answer, its last chunk with usage) and the serving node.
fn paid_chat(
    client: &reqwest::blocking::Client,
    url: &str,
    key: Option<&str>,
    i: usize,
    stream: bool,
) -> (u16, Value, String) {
    let mut request = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": format!("Count to {i}.")}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": stream,
            "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        }));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().expect("the node answers");
    let status = response.status().as_u16();
    let node = response
        .headers()
        .get("x-gaia-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !stream || status != 200 {
        return (status, response.json().expect("a JSON body"), node);
    }
    let text = response.text().expect("an event stream");
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|chunk| chunk.get("usage").is_some_and(|u| !u.is_null()))
        .unwrap_or_else(|| panic!("no usage chunk in:\n{text}"));
    (status, usage, node)
}

/// The environment of a node of the test domain that takes payments at `contract`, asking
/// `price` per 1000 tokens and letting paid requests pay at most [`PRICE`] (or its own price).
fn payment_env(chain: &Chain, contract: &str, price: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GAIA_SWARM_HEARTBEAT_MS", "500".to_string()),
        ("GAIA_PAYMENTS_RPC_URL", chain.url.clone()),
        ("GAIA_PAYMENTS_CHAIN_ID", CHAIN_ID.to_string()),
        ("GAIA_PAYMENTS_CONTRACT", contract.to_string()),
        ("GAIA_PAYMENTS_PRICE", price.to_string()),
        // What a request entering here may pay (a node may not ask more than that).
        (
            "GAIA_PAYMENTS_MAX_PRICE",
            price.parse::<u128>().unwrap().max(PRICE).to_string(),
        ),
    ]
}

fn launch(dir: tempfile::TempDir, args: &[&str], vars: Vec<(&'static str, String)>) -> Node {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Node::launch(dir, args, &vars)
}

/// What a chat answer's usage costs at [`PRICE`].
fn usage_cost(body: &Value) -> u128 {
    let usage = &body["usage"];
    let tokens = usage["prompt_tokens"].as_u64().expect("prompt tokens")
        + usage["completion_tokens"]
            .as_u64()
            .expect("completion tokens");
    cost(u128::from(tokens), PRICE)
}

fn get_json(client: &reqwest::blocking::Client, url: &str, key: &str) -> (u16, Value) {
    let response = client
        .get(url)
        .bearer_auth(key)
        .send()
        .expect("the node answers");
    (
        response.status().as_u16(),
        response.json().expect("a JSON body"),
    )
}

fn amount(value: &Value) -> u128 {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an amount: {value}"))
}

/// Paid access keys end to end, with real `gaia` processes and the real escrow on a real chain:
/// a deposit yields an API key; a gateway takes its requests, routes them only to the member
/// within its price, debits each by the serving node's receipt and refuses with 402 once the
/// deposit cannot cover the next; a key without a deposit, a key of another escrow and no key
/// are refused; the debits survive a restart; `gaia pay settle` redeems them and the escrow
/// pays the serving node exactly what its receipts say, every wei accounted for.
#[test]
fn access_keys_pay_for_answers_until_the_deposit_runs_out() {
    let models = models_dir();
    let (operator_dir, _shared, manifest) = gaia_tests::open_domain("paid");
    let operator = key_of(operator_dir.path());
    let (user_dir, user) = account();
    let (gateway_dir, gateway_key) = account();
    let chain = Chain::start(&[&operator, &user, &gateway_key]);

    let out = pay(
        operator_dir.path(),
        &chain,
        &["deploy", "--share-bps", "1000", "--lock-seconds", "3600"],
    );
    let contract = field(&out, "contract").to_string();
    let on = ["--contract", contract.as_str()];
    // The operator's node serves and is paid.
    let serving = operator.node_id().to_string();
    pay(
        operator_dir.path(),
        &chain,
        &["payee", &serving, "--contract", &contract],
    );
    // Enough for a few dozen short answers.
    let deposit: u128 = 3 * PRICE / 2;
    let mut args = vec!["deposit", "--amount", "1500000"];
    args.extend_from_slice(&on);
    let out = pay(user_dir.path(), &chain, &args);
    let api_key = field(&out, "api key").to_string();
    let payer = field(&out, "account").to_string();
    // A deposit at another escrow: its key is no good here.
    let out = pay(operator_dir.path(), &chain, &["deploy", "--share-bps", "0"]);
    let elsewhere = field(&out, "contract").to_string();
    let out = pay(
        user_dir.path(),
        &chain,
        &["deposit", "--amount", "2000000", "--contract", &elsewhere],
    );
    let foreign_key = field(&out, "api key").to_string();

    let price = PRICE.to_string();
    let twice = (2 * PRICE).to_string();
    let payments = |price: &str| payment_env(&chain, &contract, price);
    link_models(&models, operator_dir.path());
    let first = launch(
        operator_dir,
        &["--domain", &manifest, "--p2p-port", "0"],
        payments(&price),
    );
    let boot = first.loopback_p2p();
    let pricey_dir = tempfile::tempdir().expect("a data directory");
    link_models(&models, pricey_dir.path());
    let pricey = launch(pricey_dir, &join_args(&manifest, &boot), payments(&twice));
    let gateway_args = [
        "--gateway",
        "--domain",
        manifest.as_str(),
        "--p2p-port",
        "0",
        "--bootstrap",
        boot.as_str(),
    ];
    let gateway = launch(gateway_dir, &gateway_args, payments("0"));

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("a client");
    let info = |node: &Node| -> Value {
        client
            .get(format!("{}/v1/info", node.url))
            .send()
            .and_then(|r| r.json())
            .expect("info")
    };
    let pricey_address = info(&pricey)["address"]
        .as_str()
        .expect("an address")
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let routable = gaia_tests::routable(&info(&gateway));
        if routable.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "routable: {routable:?}\n{}",
            gateway.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // No key, a malformed key, a key without a deposit, a key of another escrow.
    let (status, body, _) = paid_chat(&client, &gateway.url, None, 1, false);
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("invalid_api_key")),
        "{body}"
    );
    let (status, body, _) = paid_chat(&client, &gateway.url, Some("gaia-sk-zz"), 1, false);
    assert_eq!(status, 401, "{body}");
    let stranger = gaia_node::pay::access_key_text(&SecretKey::generate());
    for (key, why) in [
        (stranger.as_str(), "no deposit"),
        (foreign_key.as_str(), "no deposit"),
    ] {
        let (status, body, _) = paid_chat(&client, &gateway.url, Some(key), 1, false);
        assert_eq!(status, 402, "{body}");
        assert_eq!(body["error"]["type"], json!("insufficient_quota"), "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(why),
            "{body}"
        );
    }

    // Paid answers until the deposit runs out; each debited at the serving node's price.
    let mut spent = 0u128;
    let mut answered = 0;
    let refusal = loop {
        // Every third answer streamed: a streamed relayed round is debited the same way.
        let stream = answered % 3 == 1;
        let (status, body, node) =
            paid_chat(&client, &gateway.url, Some(&api_key), answered, stream);
        if status == 402 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            node, serving,
            "a paid request went to {node} (the pricey member is {pricey_address})"
        );
        spent += usage_cost(&body);
        answered += 1;
        assert!(
            answered < 40,
            "the deposit of {deposit} never ran out (spent {spent})"
        );
    };
    assert!(answered >= 3, "only {answered} answers for {deposit}");
    assert_eq!(
        refusal["error"]["code"],
        json!("insufficient_quota"),
        "{refusal}"
    );
    let balance_url = format!("{}/v1/balance", gateway.url);
    let (status, balance) = get_json(&client, &balance_url, &api_key);
    assert_eq!(status, 200, "{balance}");
    assert_eq!(balance["account"], json!(payer), "{balance}");
    assert_eq!(amount(&balance["spent_here"]), spent, "{balance}");
    assert_eq!(amount(&balance["reserved"]), 0, "{balance}");
    assert_eq!(amount(&balance["remaining"]), deposit - spent, "{balance}");
    let book = info(&gateway)["payments"].clone();
    assert_eq!(book["paying_accounts"], json!(1), "{book}");
    assert_eq!(amount(&book["debited"]), spent, "{book}");
    assert_eq!(
        book["max_price"],
        json!({"prompt": PRICE as u64, "completion": PRICE as u64}),
        "{book}"
    );
    // What the serving node signed for is what the key was charged.
    let earned = info(&first)["swarm"]["metering"]["earned"].clone();
    assert_eq!(earned["receipts"], json!(answered), "{earned}");
    assert_eq!(amount(&earned["amount"]), spent, "{earned}");

    // The debits outlive the gateway.
    let gateway_dir = gateway.stop_keep_data();
    let gateway = launch(gateway_dir, &gateway_args, payments("0"));
    let (_, after) = get_json(&client, &format!("{}/v1/balance", gateway.url), &api_key);
    assert_eq!(amount(&after["spent_here"]), spent, "{after}");

    // Settle while the gateway runs: its vouchers are redeemed; the escrow pays the serving
    // node what its receipts add up to, and a second settle has nothing to do.
    let out = pay(
        gateway.data_dir(),
        &chain,
        &["settle", "--contract", &contract],
    );
    assert!(
        out.contains(&format!("redeemed {spent} from {payer} to {serving}")),
        "{out}"
    );
    let redeem_gas = gas(&out, "redeem");
    let out = pay(
        gateway.data_dir(),
        &chain,
        &["settle", "--contract", &contract],
    );
    assert!(out.contains("nothing to settle"), "{out}");
    let (rt, escrow) = escrow_client(&chain, &contract, &operator);
    let payer_id: NodeId = payer.parse().unwrap();
    let account = rt.block_on(escrow.account(payer_id)).unwrap();
    assert_eq!(account.balance, deposit - spent);
    // After settling, what is left is the same.
    let (_, after) = get_json(&client, &format!("{}/v1/balance", gateway.url), &api_key);
    assert_eq!(amount(&after["remaining"]), deposit - spent, "{after}");

    // A top-up is seen by the running gateway at the key's next request; a gateway that
    // settles on a schedule redeems the new debits by itself.
    let top_up: u128 = PRICE;
    pay(
        user_dir.path(),
        &chain,
        &[
            "deposit",
            "--account",
            &payer,
            "--amount",
            "1000000",
            "--contract",
            &contract,
        ],
    );
    // The gateway reads a refused account again at most once a second (the balance route
    // just read it).
    std::thread::sleep(gaia_node::pay::accounts::RETRY);
    let mut spent_after = 0u128;
    for i in 0..3 {
        let (status, body, _) = paid_chat(&client, &gateway.url, Some(&api_key), 100 + i, false);
        assert_eq!(status, 200, "{body}");
        spent_after += usage_cost(&body);
    }
    // A crash with paid requests in flight: three clients keep asking the gateway, which is
    // killed (SIGKILL) under them. What a client was answered was debited and survives the
    // crash; what was in flight was debited at most once.
    let url = gateway.url.clone();
    let mut gateway = gateway;
    let (acked, most) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..3)
            .map(|c| {
                let (client, url, key) = (&client, url.as_str(), api_key.as_str());
                scope.spawn(move || {
                    let (mut acked, mut most) = (0u128, 0u128);
                    for i in 0.. {
                        let sent = client
                            .post(format!("{url}/v1/chat/completions"))
                            .bearer_auth(key)
                            .json(&json!({
                                "model": CHAT_MODEL,
                                "messages": [{"role": "user", "content": format!("Count to {c}{i}.")}],
                                "max_tokens": 8,
                                "temperature": 0,
                            }))
                            .send();
                        let Ok(response) = sent else { break };
                        if response.status().as_u16() != 200 {
                            break;
                        }
                        let Ok(body) = response.json::<Value>() else {
                            break;
                        };
                        let cost = usage_cost(&body);
                        acked += cost;
                        most = most.max(cost);
                    }
                    (acked, most)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(2500));
        gateway.kill();
        clients
            .into_iter()
            .map(|c| c.join().expect("a client"))
            .fold((0u128, 0u128), |(a, m), (ca, cm)| (a + ca, m.max(cm)))
    });
    assert!(acked > 0, "no answer came before the crash");
    spent_after += acked;
    // Embeddings are paid too, at the embedding node's price: nothing without a key, the
    // usage's tokens with one.
    let embed = |key: Option<&str>| {
        let mut request = client
            .post(format!("{}/v1/embeddings", first.url))
            .json(&json!({"model": gaia_tests::EMBEDDING_MODEL, "input": ["one", "two three"]}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().expect("the node answers");
        let status = response.status().as_u16();
        (status, response.json::<Value>().expect("a JSON body"))
    };
    let (status, body) = embed(None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = embed(Some(&api_key));
    assert_eq!(status, 200, "{body}");
    let embedded = cost(
        u128::from(body["usage"]["prompt_tokens"].as_u64().expect("tokens")),
        PRICE,
    );
    let (_, on_first) = get_json(&client, &format!("{}/v1/balance", first.url), &api_key);
    assert_eq!(amount(&on_first["spent_here"]), embedded, "{on_first}");

    let gateway_dir = gateway.stop_keep_data();
    let mut scheduled = payments("0");
    scheduled.push(("GAIA_PAYMENTS_SETTLE_SECS", "1".to_string()));
    let gateway = launch(gateway_dir, &gateway_args, scheduled);
    let (_, after) = get_json(&client, &format!("{}/v1/balance", gateway.url), &api_key);
    let total = amount(&after["spent_here"]);
    // Nothing answered is lost; nothing is counted twice (at most the three requests in
    // flight were debited without their answer arriving).
    assert!(
        total >= spent + spent_after && total <= spent + spent_after + 3 * 2 * most,
        "debited {total} after the crash, answered {}",
        spent + spent_after
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rt
        .block_on(escrow.redeemed(payer_id, operator.node_id(), gateway_key.node_id()))
        .unwrap()
        != total
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway settling every second has not redeemed {total}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Every wei: what the escrow holds for the account and what it paid out are the deposits.
    let account = rt.block_on(escrow.account(payer_id)).unwrap();
    assert_eq!(account.balance, deposit + top_up - total);
    // The operator's node is both the payee and the operator: it gets the whole amount.
    assert_eq!(
        rt.block_on(escrow.withdrawable(operator.node_id()))
            .unwrap(),
        total
    );
    println!(
        "paid answers {answered}, spent {spent} of {deposit}; settle gas {redeem_gas}; after the \
         crash {total} debited for {} answered",
        spent + spent_after
    );
}

/// One access key used at two entry nodes at once, three members serving, the real escrow on a
/// real chain. Each entry node debits on channels of its own and tells the other of every
/// voucher over the domain's gossip, so together they let the key spend its deposit once, not
/// once each: what they debit exceeds the deposit by at most the bound ARCHITECTURE.md states
/// (each entry node's requests in flight). Settling both entry nodes' books pays each member
/// exactly what its receipts add up to, less the operator's share, and every wei deposited is
/// with a member, the operator or still in the account.
/// The test domain's price per 1000 prompt tokens and per 1000 completion tokens (its
/// manifest states them), and what its members ask.
const DOMAIN_PROMPT_PRICE: u128 = 1_000_000;
const DOMAIN_COMPLETION_PRICE: u128 = 3_000_000;
const MEMBER_COMPLETION_PRICE: u128 = 2_000_000;

/// What a chat answer's usage costs at `prompt` and `completion` per 1000 tokens.
fn two_price_cost(body: &Value, prompt: u128, completion: u128) -> u128 {
    let usage = &body["usage"];
    let tokens = |what: &str| u128::from(usage[what].as_u64().expect("token counts"));
    (tokens("prompt_tokens") * prompt + tokens("completion_tokens") * completion).div_ceil(1000)
}

/// The environment of a node of a priced domain asking `prompt` and `completion` per 1000
/// tokens (the manifest's prices bound what paid requests pay).
fn priced_env(
    chain: &Chain,
    contract: &str,
    prompt: u128,
    completion: u128,
) -> Vec<(&'static str, String)> {
    vec![
        ("GAIA_SWARM_HEARTBEAT_MS", "500".to_string()),
        ("GAIA_PAYMENTS_RPC_URL", chain.url.clone()),
        ("GAIA_PAYMENTS_CHAIN_ID", CHAIN_ID.to_string()),
        ("GAIA_PAYMENTS_CONTRACT", contract.to_string()),
        ("GAIA_PAYMENTS_PROMPT_PRICE", prompt.to_string()),
        ("GAIA_PAYMENTS_COMPLETION_PRICE", completion.to_string()),
    ]
}

/// A priced domain end to end: its manifest states a price per 1000 prompt tokens and per 1000
/// completion tokens and the operator's share; two entry nodes take one key's requests at once
/// and route them to the three members within the domain's price, never to the fourth, which
/// asks more for completion tokens; each answer is debited at the serving member's two prices;
/// the entry nodes together spend the deposit once (within the stated bound); settling pays
/// each member what its receipts add up to. An entry node pointed at an escrow with another
/// operator share refuses paid requests with a clear error.
#[test]
fn two_entry_nodes_share_one_deposit_and_each_member_is_paid_its_receipts() {
    let models = models_dir();
    let (operator_dir, _shared, manifest) = gaia_tests::open_domain_with(
        "paid-twice",
        &[
            "--prompt-price",
            &DOMAIN_PROMPT_PRICE.to_string(),
            "--completion-price",
            &DOMAIN_COMPLETION_PRICE.to_string(),
            "--operator-share",
            "1000",
        ],
    );
    let operator = key_of(operator_dir.path());
    let (user_dir, user) = account();
    let entries: Vec<(tempfile::TempDir, SecretKey)> = (0..2).map(|_| account()).collect();
    let members: Vec<(tempfile::TempDir, SecretKey)> = (0..2).map(|_| account()).collect();
    let mut funded = vec![&operator, &user];
    funded.extend(entries.iter().map(|(_, k)| k));
    let chain = Chain::start(&funded);
    let out = pay(
        operator_dir.path(),
        &chain,
        &["deploy", "--share-bps", "1000", "--lock-seconds", "3600"],
    );
    let contract = field(&out, "contract").to_string();
    let mut serving: Vec<NodeId> = vec![operator.node_id()];
    serving.extend(members.iter().map(|(_, k)| k.node_id()));
    for node in &serving {
        pay(
            operator_dir.path(),
            &chain,
            &["payee", &node.to_string(), "--contract", &contract],
        );
    }
    // About forty short answers.
    let deposit: u128 = 2_000_000;
    let out = pay(
        user_dir.path(),
        &chain,
        &[
            "deposit",
            "--amount",
            &deposit.to_string(),
            "--contract",
            &contract,
        ],
    );
    let api_key = field(&out, "api key").to_string();
    let payer: NodeId = field(&out, "account").parse().unwrap();

    let env = || {
        priced_env(
            &chain,
            &contract,
            DOMAIN_PROMPT_PRICE,
            MEMBER_COMPLETION_PRICE,
        )
    };
    link_models(&models, operator_dir.path());
    let first = launch(
        operator_dir,
        &["--domain", &manifest, "--p2p-port", "0"],
        env(),
    );
    let boot = first.loopback_p2p();
    let join = join_args(&manifest, &boot);
    let mut servers = vec![first];
    for (dir, _) in members {
        link_models(&models, dir.path());
        servers.push(launch(dir, &join, env()));
    }
    // Asks more per completion token than the domain lets paid requests pay.
    let pricey_dir = tempfile::tempdir().expect("a data directory");
    link_models(&models, pricey_dir.path());
    let pricey = launch(
        pricey_dir,
        &join,
        priced_env(
            &chain,
            &contract,
            DOMAIN_PROMPT_PRICE,
            DOMAIN_COMPLETION_PRICE + 1,
        ),
    );
    let mut gateway_args = vec!["--gateway"];
    gateway_args.extend_from_slice(&join);
    let gateways: Vec<Node> = entries
        .into_iter()
        .map(|(dir, _)| launch(dir, &gateway_args, env()))
        .collect();

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("a client");
    let info = |node: &Node| -> Value {
        client
            .get(format!("{}/v1/info", node.url))
            .send()
            .and_then(|r| r.json())
            .expect("info")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    for gateway in &gateways {
        while gaia_tests::routable(&info(gateway)).len() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "not every member is routable:\n{}",
                gateway.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Two clients per entry node, at once, until the key is refused everywhere.
    const CLIENTS: usize = 2;
    let results: Vec<(u128, u128, usize)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2 * CLIENTS)
            .map(|i| {
                let (client, api_key) = (&client, api_key.as_str());
                let url = gateways[i % 2].url.clone();
                scope.spawn(move || {
                    let (mut spent, mut most, mut answers) = (0u128, 0u128, 0usize);
                    loop {
                        let (status, body, _) =
                            paid_chat(client, &url, Some(api_key), 1000 * i + answers, false);
                        if status == 402 {
                            assert_eq!(body["error"]["code"], json!("insufficient_quota"));
                            return (spent, most, answers);
                        }
                        assert_eq!(status, 200, "{body}");
                        let cost =
                            two_price_cost(&body, DOMAIN_PROMPT_PRICE, MEMBER_COMPLETION_PRICE);
                        spent += cost;
                        most = most.max(cost);
                        answers += 1;
                        assert!(answers < 100, "the deposit never ran out");
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a client"))
            .collect()
    });
    let spent: u128 = results.iter().map(|r| r.0).sum();
    let most = results.iter().map(|r| r.1).max().unwrap_or(0);
    let answers: usize = results.iter().map(|r| r.2).sum();
    assert!(answers >= 10, "only {answers} answers for {deposit}");
    // The bound: beyond the deposit, at most what each entry node had in flight when it
    // could not yet know the other's last debits (its clients' requests).
    let bound = 2 * CLIENTS as u128 * most;
    assert!(
        spent <= deposit + bound,
        "the two entry nodes let {spent} be spent of {deposit} (bound {bound})"
    );
    // Each entry node knows what the other debited (its vouchers came over gossip), and the
    // two debited what the clients were told they used.
    std::thread::sleep(Duration::from_millis(1000));
    let balances: Vec<Value> = gateways
        .iter()
        .map(|g| get_json(&client, &format!("{}/v1/balance", g.url), &api_key).1)
        .collect();
    let here: Vec<u128> = balances.iter().map(|b| amount(&b["spent_here"])).collect();
    assert_eq!(here[0] + here[1], spent, "{balances:?}");
    assert!(here[0] > 0 && here[1] > 0, "{balances:?}");
    assert_eq!(
        amount(&balances[0]["spent_elsewhere"]),
        here[1],
        "{balances:?}"
    );
    assert_eq!(
        amount(&balances[1]["spent_elsewhere"]),
        here[0],
        "{balances:?}"
    );

    // The manifest's prices bound paid requests: the member asking more never served one,
    // and was told why at start.
    for gateway in &gateways {
        let payments = info(gateway)["payments"].clone();
        assert_eq!(
            payments["max_price"],
            json!({"prompt": DOMAIN_PROMPT_PRICE, "completion": DOMAIN_COMPLETION_PRICE}),
            "{payments}"
        );
        assert_eq!(
            payments["domain_pricing"]["operator_share_bps"],
            json!(1000)
        );
    }
    let earned = info(&pricey)["swarm"]["metering"]["earned"].clone();
    assert_eq!(amount(&earned["amount"]), 0, "{earned}");
    assert!(
        pricey.stderr().contains("above the domain's price"),
        "{}",
        pricey.stderr()
    );

    // An entry node that joins now (or restarts) heard none of those debits over gossip: it
    // asks its peers for the vouchers they know when it connects, so it counts everything
    // the key spent and refuses it too, instead of seeing the whole deposit on chain.
    let (late_dir, _) = account();
    let late = launch(late_dir, &gateway_args, env());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let late_balance = loop {
        let (status, balance) = get_json(&client, &format!("{}/v1/balance", late.url), &api_key);
        if status == 200 && amount(&balance["spent_elsewhere"]) == spent {
            break balance;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late entry node knows {balance} of {spent} spent:\n{}",
            late.stderr()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(amount(&late_balance["spent_here"]), 0, "{late_balance}");
    let (status, body, _) = paid_chat(&client, &late.url, Some(&api_key), 7, false);
    assert_eq!(status, 402, "{body}");

    // Telling each other of every debit cost no entry node its standing: nobody was
    // penalised (shares have a budget of their own).
    for node in servers.iter().chain(&gateways).chain([&pricey, &late]) {
        let penalised = info(node)["swarm"]["penalised"].clone();
        assert_eq!(penalised, json!([]), "{}", node.url);
    }

    // Settle both books: each channel (member, entry node) is redeemed.
    for gateway in &gateways {
        let out = pay(
            gateway.data_dir(),
            &chain,
            &["settle", "--contract", &contract],
        );
        assert!(out.contains("redeemed"), "{out}");
    }
    let (rt, escrow) = escrow_client(&chain, &contract, &operator);
    let entry_ids: Vec<NodeId> = gateways
        .iter()
        .map(|g| info(g)["address"].as_str().unwrap().parse().unwrap())
        .collect();
    let left = rt.block_on(escrow.account(payer)).unwrap().balance;
    let withdrawable = |node: &NodeId| rt.block_on(escrow.withdrawable(*node)).unwrap();
    let (mut redeemed, mut served) = (0u128, 0);
    let mut owed = Vec::new();
    for (node, server) in serving.iter().zip(&servers) {
        let earned = info(server)["swarm"]["metering"]["earned"].clone();
        let receipts = amount(&earned["amount"]);
        served += usize::from(receipts > 0);
        let channels: Vec<u128> = entry_ids
            .iter()
            .map(|entry| rt.block_on(escrow.redeemed(payer, *node, *entry)).unwrap())
            .collect();
        // Each member's channels were redeemed up to what its receipts add up to (less, when
        // the account could not cover them all: the rest waits for a top-up).
        let channel_sum: u128 = channels.iter().sum();
        assert!(
            channel_sum == receipts || (spent > deposit && channel_sum < receipts),
            "{node}: redeemed {channels:?}, receipts {earned}"
        );
        redeemed += channel_sum;
        // Less the operator's 10 % (taken per redeem, one per channel here).
        owed.push(channels.iter().map(|c| c - c / 10).sum::<u128>());
    }
    assert_eq!(redeemed, spent.min(deposit));
    assert!(served >= 2, "only {served} members served");
    let payouts: u128 = serving.iter().map(withdrawable).sum();
    if spent <= deposit {
        // Every wei: paid out (to members and, as its share, to the operator, itself a
        // member here) or still in the account.
        assert_eq!(left + payouts, deposit);
        assert_eq!(payouts, spent);
        for (i, node) in serving.iter().enumerate().skip(1) {
            assert_eq!(withdrawable(node), owed[i], "{node}");
        }
        let cuts: u128 = (0..serving.len())
            .map(|i| {
                let channels: u128 = entry_ids
                    .iter()
                    .map(|e| rt.block_on(escrow.redeemed(payer, serving[i], *e)).unwrap())
                    .sum();
                channels - owed[i]
            })
            .sum();
        assert_eq!(withdrawable(&operator.node_id()), owed[0] + cuts);
    } else {
        // Overspent within the bound: the escrow paid out what the account held, no more.
        assert_eq!((left, payouts), (0, deposit));
    }

    // An escrow that pays its operator another share than the manifest states is not the
    // domain's: an entry node pointed at it refuses paid requests and says why.
    let out = pay(
        servers[0].data_dir(),
        &chain,
        &["deploy", "--share-bps", "500", "--lock-seconds", "3600"],
    );
    let other = field(&out, "contract").to_string();
    let (stray_dir, _) = account();
    let stray = launch(
        stray_dir,
        &gateway_args,
        priced_env(&chain, &other, DOMAIN_PROMPT_PRICE, MEMBER_COMPLETION_PRICE),
    );
    let (status, body, _) = paid_chat(&client, &stray.url, Some(&api_key), 1, false);
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("500 basis points") && message.contains("1000 basis points"),
        "{body}"
    );
    println!(
        "two entry nodes: {answers} answers, {spent} debited of {deposit} (bound {bound}), \
         {left} left in the account"
    );
}
