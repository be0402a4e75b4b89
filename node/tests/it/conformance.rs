//! API conformance: the official `openai` and `anthropic` Python packages against a real
//! `gaia start`.
//!
//! The scripts are `tests/conformance/test_openai.py` and `test_anthropic.py`; `tests/run` installs its pinned packages
//! into a virtual environment and points `GAIA_TEST_PYTHON` at that environment's python.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gaia_tests::{CHAT_MODEL, EMBEDDING_MODEL, Node};

/// The python that has `openai` and `jsonschema`; fails with what to do when it is missing.
pub(crate) fn python() -> PathBuf {
    let python = std::env::var_os("GAIA_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "GAIA_TEST_PYTHON is not set: it names a python with the packages of \
             tests/conformance/requirements.txt. tests/run sets it up; by hand: \
             python3 -m venv target/test-venv && target/test-venv/bin/pip install -r \
             tests/conformance/requirements.txt && export GAIA_TEST_PYTHON=$PWD/target/test-venv/bin/python"
        )
    });
    assert!(
        python.exists(),
        "GAIA_TEST_PYTHON={} does not exist: create the venv (see tests/run)",
        python.display()
    );
    let probe = Command::new(&python)
        .args(["-c", "import openai, anthropic, jsonschema"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        probe.status.success(),
        "{} lacks the conformance packages: pip install -r tests/conformance/requirements.txt\n{}",
        python.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    python
}

/// Runs conformance script `name` (under tests/conformance) against `node` with `env`, and
/// fails with its report and the node's log unless every check passed.
fn run_script(name: &str, node: &Node, env: &[(&str, String)]) {
    let python = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance")
        .join(name);
    assert!(script.exists(), "{} is missing", script.display());
    let start = Instant::now();
    let out = Command::new(&python)
        .arg(&script)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("GAIA_CHAT_MODEL", CHAT_MODEL)
        .env("GAIA_EMBED_MODEL", EMBEDDING_MODEL)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("the conformance script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Surface the script's report whether it passed or not (`cargo test -- --nocapture`).
    println!("{stdout}{stderr}\n({name} took {:?})", start.elapsed());
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{stderr}\n\nnode stderr (tail):\n{}",
        out.status,
        node.stderr()
    );
}

#[test]
fn the_official_openai_client_works_against_the_node() {
    let node = Node::start(&[]);
    let env = [
        ("OPENAI_BASE_URL", format!("{}/v1", node.url)),
        ("OPENAI_API_KEY", "not-needed".to_string()),
    ];
    run_script("test_openai.py", &node, &env);
}

#[test]
fn the_official_anthropic_client_works_against_the_node() {
    let node = Node::start(&[("GAIA_KNOWLEDGE_ENABLED", "false")]);
    let env = [
        ("ANTHROPIC_BASE_URL", node.url.clone()),
        ("ANTHROPIC_API_KEY", "not-needed".to_string()),
    ];
    run_script("test_anthropic.py", &node, &env);
}

/// schemathesis (PyPI), every check and a fixed seed, against the node's own `/openapi.json`:
/// the document and the server agree on every generated request, valid and invalid, and no
/// request gets a 5xx.
#[test]
fn schemathesis_finds_the_openapi_document_true() {
    let python = python();
    let schemathesis = python.with_file_name("schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: pip install -r tests/conformance/requirements.txt",
        schemathesis.display()
    );
    // An 8-token answer limit keeps each generated chat short.
    let node = Node::start(&[
        ("GAIA_SERVER_MAX_TOKENS", "8"),
        ("GAIA_AGENT_MAX_TOKENS", "8"),
    ]);
    // The rules between fields that JSON Schema cannot state (see the file).
    let hooks =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/schemathesis_hooks.py");
    assert!(hooks.exists(), "{} is missing", hooks.display());
    let work = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Command::new(&schemathesis)
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .args(["run", &format!("{}/openapi.json", node.url)])
        .args(["--checks", "all", "--max-examples", "30", "--workers", "1"])
        .args(["--seed", "1", "--generation-database", "none", "--no-color"])
        // A long prompt takes seconds on two cores.
        .args(["--request-timeout", "120", "--max-response-time", "120"])
        .current_dir(work.path())
        .output()
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "{stdout}{stderr}\n(schemathesis took {:?})",
        start.elapsed()
    );
    assert!(
        out.status.success(),
        "schemathesis found failures ({}):\n{stdout}\n{stderr}\n\nnode stderr (tail):\n{}",
        out.status,
        node.stderr()
    );
    // The run must have exercised the API, not stopped at the document.
    let generated: usize = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" generated"))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no case count in schemathesis's report:\n{stdout}"));
    assert!(
        generated >= 300,
        "schemathesis generated only {generated} cases"
    );
}
