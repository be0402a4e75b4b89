//! Gaia's multi-node and multi-process scenarios, and the harness that runs the real `gaia`
//! binary for them and for the node's own integration tests.
//!
//! The scenarios are the `it` test of this crate (`tests/it/`): domains of `gaia` processes
//! on loopback (`cluster`), nodes behind NAT in network namespaces (`nat`), and libp2p swarms
//! in one process (`swarm`, `swarm_hardening`). Single-process tests of one node stay with the
//! node (`node/tests/it/`) and use this library to start it.
//!
//! # Which binary runs
//!
//! Cargo sets `CARGO_BIN_EXE_gaia` only for the tests of the package that defines the binary
//! (`gaia-node`), and builds a dependency's binaries for nobody. So [`gaia_bin`] finds the
//! binary next to the running test executable (`target/release/deps/it-HASH` ->
//! `target/release/gaia`), unless `GAIA_BIN` names one. It is there when:
//!
//! - `cargo test --release --workspace` runs: cargo builds every target of the selected
//!   packages, `gaia-node`'s binary included, before it runs any test;
//! - `tests/run` (CI) runs: it builds `--workspace --all-targets` before clippy and the tests.
//!
//! `cargo test --release -p gaia-tests` alone builds neither the binary nor its changes: run
//! `cargo build --release` first (a stale binary would test old code).
//!
//! # Environment
//!
//! - `GAIA_MODELS_DIR`: a model store holding the default models (`tests/run` pulls them and
//!   sets it); see [`models_dir`].
//! - `GAIA_BIN`: the `gaia` binary to run instead of the one next to the test executable.
//! - `GAIA_TEST_KEEP_LOGS=DIR`: keep every node's stderr in `DIR/<http port>.log`.

#![warn(missing_docs, unreachable_pub)]

mod node;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub use node::{CHAT_MODEL, EMBEDDING_MODEL, Node, link_models, models_dir};

/// The arguments of `gaia start` for a member joining the domain of `manifest` through the
/// member at `bootstrap`, its libp2p port chosen by the system.
pub fn join_args<'a>(manifest: &'a str, bootstrap: &'a str) -> [&'a str; 6] {
    [
        "--domain",
        manifest,
        "--p2p-port",
        "0",
        "--bootstrap",
        bootstrap,
    ]
}

/// The `gaia` binary the tests run: `GAIA_BIN` when set, else `gaia` in the target directory
/// of the running test executable. Panics, saying how to build it, when it is missing.
pub fn gaia_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("GAIA_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "GAIA_BIN={} is not a file: point it at a built `gaia` binary, or unset it to \
                 use target/release/gaia",
                bin.display()
            );
            return bin;
        }
        let exe = std::env::current_exe().expect("the path of the test executable");
        // target/<profile>/deps/it-HASH: the binary is in target/<profile>.
        let mut dir = exe.parent().expect("the test executable's directory");
        if dir.ends_with("deps") {
            dir = dir.parent().expect("the profile directory");
        }
        let bin = dir.join(format!("gaia{}", std::env::consts::EXE_SUFFIX));
        assert!(
            bin.is_file(),
            "no gaia binary at {}: build it first with `cargo build --release` (`cargo test \
             --release --workspace` and tests/run build it; `cargo test -p gaia-tests` alone \
             does not), or set GAIA_BIN=/path/to/gaia",
            bin.display()
        );
        bin
    })
}

/// Runs `gaia --data-dir DIR --quiet ARGS...` and returns its output.
pub fn gaia(data_dir: &Path, args: &[&str]) -> Output {
    gaia_env(data_dir, args, &[])
}

/// Like [`gaia`] with extra environment variables.
pub fn gaia_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(gaia_bin());
    cmd.arg("--data-dir")
        .arg(data_dir)
        .arg("--quiet")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the gaia binary runs")
}

/// stdout and stderr as one string, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An open domain `name` created by a fresh operator with `gaia domain create`: the
/// operator's data directory, the directory holding the copy of the manifest handed to
/// members, and that copy's path.
pub fn open_domain(name: &str) -> (tempfile::TempDir, tempfile::TempDir, String) {
    open_domain_with(name, &[])
}

/// [`open_domain`] with more `gaia domain create` flags (prices, for example).
pub fn open_domain_with(
    name: &str,
    extra: &[&str],
) -> (tempfile::TempDir, tempfile::TempDir, String) {
    let operator = tempfile::tempdir().expect("a data directory");
    let out = gaia(operator.path(), &["init", "--no-models"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut args = vec!["domain", "create", name, "--policy", "open"];
    args.extend_from_slice(extra);
    let out = gaia(operator.path(), &args);
    assert!(out.status.success(), "{}", text(&out));
    let shared = tempfile::tempdir().expect("a directory for the manifest");
    let manifest = shared.path().join(format!("{name}.manifest"));
    std::fs::copy(
        operator.path().join(format!("domains/{name}/manifest.bin")),
        &manifest,
    )
    .expect("the manifest is copied");
    (operator, shared, manifest.to_string_lossy().to_string())
}

/// The routable members listed in a node's `/v1/info` body, sorted.
pub fn routable(info: &serde_json::Value) -> Vec<String> {
    let mut nodes: Vec<String> = info["swarm"]["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter(|m| m["routable"] == serde_json::json!(true))
                .filter_map(|m| m["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}
