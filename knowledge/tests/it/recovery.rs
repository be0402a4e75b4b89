//! Opening after crashes and damage: the last good state comes back, with a report.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gaia_knowledge::testing::ToyEmbedder;
use gaia_knowledge::{KbOptions, KnowledgeBase, OpenError, SearchMode, SearchQuery, no_progress};

use crate::{corpus_kb, open, open_with};

fn index_file(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "usearch"))
        .expect("an index checkpoint exists")
}

/// Copies the files of an open knowledge base: what a crash at this instant would leave.
fn snapshot_dir(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "LOCK" {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn assert_searchable(kb: &KnowledgeBase) {
    let info = kb.info();
    assert_eq!(info.vectors, info.chunks);
    let hits = kb
        .search(&SearchQuery::new("volcano magma eruption").mode(SearchMode::Vector))
        .unwrap();
    assert_eq!(hits[0].source, "volcanoes.html");
    let hits = kb
        .search(&SearchQuery::new("varroa").mode(SearchMode::Keyword))
        .unwrap();
    assert_eq!(hits[0].source, "beekeeping.md");
}

#[test]
fn a_damaged_or_missing_index_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let kb = corpus_kb(dir.path());
    let hash = kb.hash();
    kb.close().unwrap();
    let kb = open(dir.path());
    assert!(kb.recovery().is_clean(), "{:?}", kb.recovery());
    drop(kb);

    // Flip bytes in the middle of the index file.
    let path = index_file(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xa5;
    }
    fs::write(&path, &bytes).unwrap();
    let kb = open(dir.path());
    assert!(kb.recovery().index_rebuilt.is_some(), "{:?}", kb.recovery());
    assert_eq!(kb.hash(), hash);
    assert_searchable(&kb);
    drop(kb);
    let kb = open(dir.path());
    assert!(
        kb.recovery().is_clean(),
        "the rebuilt index was checkpointed: {:?}",
        kb.recovery()
    );
    drop(kb);

    // Truncated, then deleted.
    let path = index_file(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let kb = open(dir.path());
    assert!(kb.recovery().index_rebuilt.is_some());
    assert_searchable(&kb);
    drop(kb);
    fs::remove_file(index_file(dir.path())).unwrap();
    let kb = open(dir.path());
    assert!(kb.recovery().index_rebuilt.is_some());
    assert_eq!(kb.hash(), hash);
    assert_searchable(&kb);
}

#[test]
fn a_damaged_manifest_leads_to_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let kb = corpus_kb(dir.path());
    let hash = kb.hash();
    drop(kb);
    fs::write(dir.path().join("manifest.json"), b"{ this is not json").unwrap();
    let kb = open(dir.path());
    assert!(
        kb.recovery()
            .index_rebuilt
            .as_deref()
            .unwrap()
            .contains("manifest"),
        "{:?}",
        kb.recovery()
    );
    assert_eq!(kb.hash(), hash);
    assert_searchable(&kb);
}

#[test]
fn a_crash_between_checkpoints_replays_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut kb = corpus_kb(dir.path());
    kb.ingest_bytes(
        b"# Late\n\nA late addition about quokkas.",
        "late.md",
        None,
        &mut no_progress,
    )
    .unwrap();
    kb.remove_source("tides.md").unwrap();
    let hash = kb.hash();
    // The files as a crash right now would leave them: the log has both changes, the checkpoint
    // does not.
    let crashed = tempfile::tempdir().unwrap();
    snapshot_dir(dir.path(), crashed.path());
    drop(kb);
    let kb = open(crashed.path());
    assert!(kb.recovery().index_rebuilt.is_none(), "{:?}", kb.recovery());
    assert!(kb.recovery().chunks_replayed > 0);
    assert_eq!(kb.hash(), hash);
    let hits = kb
        .search(&SearchQuery::new("quokkas").mode(SearchMode::Vector))
        .unwrap();
    assert_eq!(hits[0].source, "late.md");
    let hits = kb
        .search(
            &SearchQuery::new("spring neap moon tides")
                .mode(SearchMode::Vector)
                .top_k(50),
        )
        .unwrap();
    assert!(
        hits.iter().all(|h| h.source != "tides.md"),
        "removed chunks left the index"
    );
}

#[test]
fn a_torn_tail_is_cut_and_later_appends_work() {
    let dir = tempfile::tempdir().unwrap();
    let kb = corpus_kb(dir.path());
    let hash = kb.hash();
    drop(kb);
    let mut log = OpenOptions::new()
        .append(true)
        .open(dir.path().join("kb.log"))
        .unwrap();
    log.write_all(b"\xffGK\xfe\x02\0\0\0half a record").unwrap();
    drop(log);
    let mut kb = open(dir.path());
    assert_eq!(kb.recovery().torn_tail_bytes, 21);
    assert_eq!(kb.hash(), hash);
    kb.ingest_bytes(b"after the crash", "after.txt", None, &mut no_progress)
        .unwrap();
    drop(kb);
    let kb = open(dir.path());
    assert!(kb.recovery().is_clean(), "{:?}", kb.recovery());
    assert!(kb.source("after.txt").is_some());
}

#[test]
fn damage_inside_the_log_loses_only_the_damaged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut kb = open(dir.path());
    for i in 0..5 {
        let text = format!("# Doc {i}\n\nUnique word kumquat{i} lives here.");
        kb.ingest_bytes(
            text.as_bytes(),
            &format!("doc{i}.md"),
            None,
            &mut no_progress,
        )
        .unwrap();
    }
    drop(kb);
    let log_path = dir.path().join("kb.log");
    let mut bytes = fs::read(&log_path).unwrap();
    let at = bytes.windows(9).position(|w| w == b"kumquat2 ").unwrap();
    bytes[at] ^= 0x01;
    fs::write(&log_path, &bytes).unwrap();
    let kb = open(dir.path());
    let report = kb.recovery().clone();
    assert_eq!(report.damaged_ranges.len(), 1, "{report:?}");
    let copy = report.damaged_log_copy.clone().unwrap();
    assert_eq!(
        fs::read(&copy).unwrap(),
        bytes,
        "the damaged log is kept for inspection"
    );
    let sources: Vec<String> = kb.list_sources().into_iter().map(|s| s.source).collect();
    assert_eq!(sources, vec!["doc0.md", "doc1.md", "doc3.md", "doc4.md"]);
    drop(kb);
    let kb = open(dir.path());
    assert!(
        kb.recovery().is_clean(),
        "the log was compacted: {:?}",
        kb.recovery()
    );
    assert_eq!(kb.list_sources().len(), 4);
}

#[test]
fn open_refuses_busy_foreign_and_orphaned_directories() {
    let dir = tempfile::tempdir().unwrap();
    let kb = open(dir.path());
    let second = KnowledgeBase::open(
        dir.path(),
        Arc::new(ToyEmbedder::new()),
        KbOptions::default(),
    );
    assert!(matches!(second, Err(OpenError::Busy { .. })));
    drop(kb);

    let other = KnowledgeBase::open(
        dir.path(),
        Arc::new(ToyEmbedder::new().with_model_id("bigger-model")),
        KbOptions::default(),
    );
    let err = other.unwrap_err();
    assert!(matches!(err, OpenError::ModelMismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("bigger-model") && msg.contains("toy-hashed-bag-of-words"),
        "{msg}"
    );

    fs::remove_file(dir.path().join("kb.log")).unwrap();
    let err = KnowledgeBase::open(
        dir.path(),
        Arc::new(ToyEmbedder::new()),
        KbOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, OpenError::LogMissing { .. }), "{err}");

    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("kb.log"), b"garbage header").unwrap();
    let err = KnowledgeBase::open(
        dir.path(),
        Arc::new(ToyEmbedder::new()),
        KbOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, OpenError::LogDamaged { .. }), "{err}");
}

#[test]
fn compaction_reclaims_space_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let options = KbOptions {
        compact_after_dead_bytes: u64::MAX,
        ..KbOptions::default()
    };
    let mut kb = open_with(dir.path(), ToyEmbedder::new(), options.clone());
    for round in 0..5 {
        for i in 0..10 {
            let text = format!("# Note {i}\n\nRound {round} of note {i}, about otters{i}.");
            kb.ingest_bytes(text.as_bytes(), &format!("n{i}.md"), None, &mut no_progress)
                .unwrap();
        }
    }
    let hash = kb.hash();
    let info = kb.info();
    assert!(info.reclaimable_bytes > 0);
    let report = kb.compact().unwrap();
    assert!(report.bytes_after < report.bytes_before / 2, "{report:?}");
    assert_eq!(kb.hash(), hash);
    assert_eq!(kb.info().reclaimable_bytes, 0);
    kb.ingest_bytes(b"after compaction", "x.txt", None, &mut no_progress)
        .unwrap();
    let hash = kb.hash();
    drop(kb);
    let kb = open_with(dir.path(), ToyEmbedder::new(), options);
    assert!(kb.recovery().is_clean(), "{:?}", kb.recovery());
    assert_eq!(kb.hash(), hash);
    let hits = kb
        .search(&SearchQuery::new("otters3").mode(SearchMode::Keyword))
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert!(hits[0].text.contains("Round 4"));
}
