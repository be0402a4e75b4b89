//! A real `gaia start` process: temporary data directory, port 0, the models of
//! `GAIA_MODELS_DIR` (linked into the data directory's store). Dropping the handle kills the
//! process.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The chat model every test asks for.
pub const CHAT_MODEL: &str = "smollm2-135m-instruct";
/// The embedding model.
pub const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

/// How long a node may take to load its models and bind.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// A running `gaia start` process.
pub struct Node {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// The peer-to-peer addresses it printed (`gaia: peer-to-peer on ADDR`), when in a domain.
    pub p2p: Vec<String>,
    stderr_log: PathBuf,
    _data_dir: tempfile::TempDir,
}

/// The model store the tests use; panics with what to do when it is not set up.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("GAIA_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "GAIA_MODELS_DIR is not set: point it at a model store holding {CHAT_MODEL} and \
             {EMBEDDING_MODEL} (tests/run pulls them and sets it; locally e.g. \
             GAIA_MODELS_DIR=/work/models-store)"
            )
        });
    for model in [CHAT_MODEL, EMBEDDING_MODEL] {
        assert!(
            dir.join(model).is_dir(),
            "the model store {} has no {model}: run `gaia --data-dir DIR models pull` and set \
             GAIA_MODELS_DIR=DIR/models",
            dir.display()
        );
    }
    dir
}

impl Node {
    /// Starts `gaia start` on a free port with extra environment variables (e.g.
    /// `GAIA_SERVER_QUEUE_DEPTH`) and waits for its `gaia: listening on` line.
    pub fn start(env: &[(&str, &str)]) -> Node {
        let data_dir = tempfile::tempdir().expect("a temporary data directory");
        link_models(&models_dir(), data_dir.path());
        Node::launch(data_dir, &[], env)
    }

    /// Starts `gaia start ARGS...` in `data_dir` (which the node owns from now on) and waits
    /// for its `gaia: listening on` line.
    pub fn launch(data_dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Node {
        Node::launch_in(None, data_dir, args, env)
    }

    /// Like [`Node::launch`], inside the network namespace `netns` when given (`ip netns
    /// exec`); the HTTP API then listens on that namespace's loopback.
    pub fn launch_in(
        netns: Option<&str>,
        data_dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let stderr_log = data_dir.path().join("gaia-stderr.log");
        let stderr = std::fs::File::create(&stderr_log).expect("a log file for the node");
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(crate::gaia_bin());
                cmd
            }
            None => Command::new(crate::gaia_bin()),
        };
        cmd.arg("--data-dir")
            .arg(data_dir.path())
            .arg("--quiet")
            .arg("start")
            .args(args)
            .env("GAIA_SERVER_HOST", "127.0.0.1")
            .env("GAIA_SERVER_PORT", "0")
            .env_remove("GAIA_SERVER_API_KEYS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the gaia binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mut p2p = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.trim().strip_prefix("gaia: peer-to-peer on ") {
                    p2p.push(addr.trim().to_string());
                }
                if let Some(url) = line.trim().strip_prefix("gaia: listening on ") {
                    let _ = tx.try_send((url.trim().to_string(), std::mem::take(&mut p2p)));
                }
                // Keep draining so the node never blocks on a full pipe.
            }
        });
        let (url, p2p) = match rx.recv_timeout(START_TIMEOUT) {
            Ok(found) => found,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "gaia start did not print `gaia: listening on http://ADDR` within {:?}; its \
                     stderr:\n{}",
                    START_TIMEOUT,
                    read_log(&stderr_log)
                );
            }
        };
        let addr = url
            .strip_prefix("http://")
            .unwrap_or(&url)
            .trim_end_matches('/')
            .to_string();
        Node {
            child,
            url: format!("http://{addr}"),
            addr,
            p2p,
            stderr_log,
            _data_dir: data_dir,
        }
    }

    /// What the node wrote to stderr so far (for assertion messages).
    pub fn stderr(&self) -> String {
        read_log(&self.stderr_log)
    }

    /// Its loopback peer-to-peer address (to bootstrap other nodes from); panics with its
    /// stderr if it printed none.
    pub fn loopback_p2p(&self) -> String {
        self.p2p
            .iter()
            .find(|a| a.starts_with("/ip4/127.0.0.1/"))
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "the node printed no loopback peer-to-peer address: {:?}\n{}",
                    self.p2p,
                    self.stderr()
                )
            })
    }

    /// Its data directory (the process owns it; read it, or run `gaia` commands on it).
    pub fn data_dir(&self) -> &Path {
        self._data_dir.path()
    }

    /// Stops the process (SIGKILL) and hands back its data directory, to start it again.
    pub fn stop_keep_data(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().expect("a temporary directory");
        std::mem::replace(&mut self._data_dir, placeholder)
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // GAIA_TEST_KEEP_LOGS=DIR keeps every node's stderr (DIR/<http port>.log), for
        // debugging a failure with e.g. GAIA_LOG=gaia_node=debug.
        if let Some(dir) = std::env::var_os("GAIA_TEST_KEEP_LOGS") {
            let port = self.addr.rsplit(':').next().unwrap_or("node");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(
                &self.stderr_log,
                Path::new(&dir).join(format!("{port}.log")),
            );
        }
    }
}

/// Points the node's model store at `models` with one symlink per file, so whatever the node
/// writes (manifests) stays in its temporary data directory.
pub fn link_models(models: &Path, data_dir: &Path) {
    for model in [CHAT_MODEL, EMBEDDING_MODEL] {
        let dir = data_dir.join("models").join(model);
        std::fs::create_dir_all(&dir).expect("the model directory is created");
        let entries = std::fs::read_dir(models.join(model))
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", models.join(model).display()));
        for entry in entries {
            let entry = entry.expect("a readable directory entry");
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()))
                .expect("a symlink in the temporary store");
        }
    }
}

fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The tail is what matters.
    let start = text.len().saturating_sub(8000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}
