//! Integration tests of the `gaia` binary, run as a real process.

mod api;
mod bad_input;
mod browser;
mod cluster;
mod conformance;
mod kb;
mod models;
mod nat;
mod serve;
mod swarm;
mod swarm_hardening;

use std::path::Path;
use std::process::{Command, Output};

/// Runs `gaia --data-dir DIR ARGS...` and returns its output.
pub(crate) fn gaia(data_dir: &Path, args: &[&str]) -> Output {
    gaia_env(data_dir, args, &[])
}

/// Like [`gaia`] with extra environment variables.
pub(crate) fn gaia_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gaia"));
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
pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
