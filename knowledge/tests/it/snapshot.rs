//! Snapshot export and import, hash determinism, refusal of foreign or tampered archives.

use std::fs;
use std::io::Read;
use std::path::Path;

use gaia_knowledge::testing::ToyEmbedder;
use gaia_knowledge::{
    ContentHash, KbOptions, SNAPSHOT_LOG, SNAPSHOT_MANIFEST, SearchQuery, SnapshotError,
    SnapshotManifest, no_progress, read_snapshot_manifest,
};
use sha2::{Digest, Sha256};

use crate::{corpus_dir, corpus_kb, open, open_with};

/// The entries of a tar archive as (name, bytes).
fn entries(archive: &Path) -> Vec<(String, Vec<u8>)> {
    let mut tar = tar::Archive::new(fs::File::open(archive).unwrap());
    tar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).unwrap();
            (name, bytes)
        })
        .collect()
}

fn write_archive(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, bytes.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn export_import_round_trip_preserves_content_hash_and_bytes() {
    let a_dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let a = corpus_kb(a_dir.path());
    let archive = out.path().join("kb.tar");
    let exported = a.export_snapshot(&archive).unwrap();
    assert_eq!(exported.hash, a.hash());
    assert_eq!(exported.documents as usize, a.info().documents);
    let names: Vec<String> = entries(&archive).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![SNAPSHOT_MANIFEST.to_string(), SNAPSHOT_LOG.to_string()]
    );
    let manifest = read_snapshot_manifest(&archive).unwrap();
    assert_eq!(manifest.kb_hash, a.hash().to_hex());
    assert_eq!(manifest.core.chunks as usize, a.info().chunks);
    assert_eq!(manifest.core.chunking, *a.chunking());

    // Import into a knowledge base that holds something else: it is replaced.
    let b_dir = tempfile::tempdir().unwrap();
    let mut b = open(b_dir.path());
    b.ingest_bytes(b"unrelated", "other.txt", None, &mut no_progress)
        .unwrap();
    let imported = b.import_snapshot(&archive, Some(&a.hash())).unwrap();
    assert_eq!(imported.hash, a.hash());
    assert_eq!(b.hash(), a.hash());
    assert_eq!(b.list_sources(), a.list_sources());
    let q = SearchQuery::new("how do glaciers carve valleys").top_k(5);
    let ids = |hits: Vec<gaia_knowledge::SearchHit>| {
        hits.into_iter()
            .map(|h| (h.source, h.ordinal))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(b.search(&q).unwrap()), ids(a.search(&q).unwrap()));

    // Exporting the imported copy gives the very same bytes.
    let again = out.path().join("again.tar");
    b.export_snapshot(&again).unwrap();
    assert_eq!(fs::read(&archive).unwrap(), fs::read(&again).unwrap());

    // And the import survives a reopen.
    drop(b);
    let b = open(b_dir.path());
    assert_eq!(b.hash(), a.hash());
}

#[test]
fn the_hash_depends_on_content_only() {
    let docs: Vec<(String, Vec<u8>)> = [
        "tides.md",
        "beekeeping.md",
        "sourdough.txt",
        "volcanoes.html",
    ]
    .iter()
    .map(|n| (n.to_string(), fs::read(corpus_dir().join(n)).unwrap()))
    .collect();
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut k1 = open(d1.path());
    let mut k2 = open(d2.path());
    let empty = k1.hash();
    assert_eq!(empty, k2.hash(), "empty knowledge bases agree");
    for (name, bytes) in &docs {
        k1.ingest_bytes(bytes, name, None, &mut no_progress)
            .unwrap();
    }
    // Other order, with a detour: a wrong version first, then a document removed and re-added.
    for (name, bytes) in docs.iter().rev() {
        k2.ingest_bytes(b"draft", name, None, &mut no_progress)
            .unwrap();
        k2.ingest_bytes(bytes, name, None, &mut no_progress)
            .unwrap();
    }
    k2.ingest_bytes(b"temporary", "temp.txt", None, &mut no_progress)
        .unwrap();
    k2.remove_source("temp.txt").unwrap();
    assert_eq!(k1.hash(), k2.hash());
    k2.compact().unwrap();
    assert_eq!(k1.hash(), k2.hash(), "compaction does not change the hash");
    drop(k2);
    let k2 = open(d2.path());
    assert_eq!(k1.hash(), k2.hash(), "reopening does not change the hash");
    assert_ne!(k1.hash(), empty);
    k1.ingest_bytes(b"# Tides\n\nchanged", "tides.md", None, &mut no_progress)
        .unwrap();
    assert_ne!(k1.hash(), k2.hash());
    // The hash is the sha256 of the canonical manifest.
    let info = k1.info();
    assert_eq!(info.hash, ContentHash::of(&info.manifest.canonical_json()));
}

#[test]
fn import_refuses_a_snapshot_of_another_model_and_names_both() {
    let a_dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let a = corpus_kb(a_dir.path());
    let archive = out.path().join("kb.tar");
    a.export_snapshot(&archive).unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let mut b = open_with(
        b_dir.path(),
        ToyEmbedder::new().with_model_id("mini-embedder-v9"),
        KbOptions::default(),
    );
    b.ingest_bytes(b"keep me", "keep.txt", None, &mut no_progress)
        .unwrap();
    let before = b.hash();
    let err = b.import_snapshot(&archive, None).unwrap_err();
    assert!(matches!(err, SnapshotError::ModelMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("toy-hashed-bag-of-words") && message.contains("mini-embedder-v9"),
        "{message}"
    );
    assert_eq!(b.hash(), before);
    assert_eq!(b.list_sources().len(), 1);
}

#[test]
fn import_refuses_tampered_archives_and_keeps_the_current_content() {
    let a_dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let a = corpus_kb(a_dir.path());
    let archive = out.path().join("kb.tar");
    a.export_snapshot(&archive).unwrap();
    let original = entries(&archive);
    let manifest: SnapshotManifest = serde_json::from_slice(&original[0].1).unwrap();
    let log = original[1].1.clone();

    let b_dir = tempfile::tempdir().unwrap();
    let mut b = open(b_dir.path());
    b.ingest_bytes(
        b"# Keep\n\nthis must survive",
        "keep.md",
        None,
        &mut no_progress,
    )
    .unwrap();
    let before = b.hash();
    let check = |b: &mut gaia_knowledge::KnowledgeBase,
                 entries: Vec<(String, Vec<u8>)>,
                 expected: Option<&ContentHash>| {
        let path = out.path().join("tampered.tar");
        write_archive(&path, &entries);
        let err = b.import_snapshot(&path, expected).unwrap_err();
        assert_eq!(
            b.hash(),
            before,
            "a failed import changed the knowledge base ({err})"
        );
        err
    };

    // A flipped byte in the log.
    let mut bad_log = log.clone();
    let mid = bad_log.len() / 2;
    bad_log[mid] ^= 0x20;
    let err = check(
        &mut b,
        vec![original[0].clone(), (SNAPSHOT_LOG.into(), bad_log.clone())],
        None,
    );
    assert!(matches!(err, SnapshotError::DigestMismatch { .. }), "{err}");

    // The same flip with the file digest in the manifest updated to match: the record checksums
    // and document digests still catch it.
    let mut m = manifest.clone();
    m.files[0].sha256 = hex::encode(Sha256::digest(&bad_log));
    let err = check(
        &mut b,
        vec![
            (SNAPSHOT_MANIFEST.into(), serde_json::to_vec(&m).unwrap()),
            (SNAPSHOT_LOG.into(), bad_log),
        ],
        None,
    );
    assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");

    // A manifest whose hash does not match its content.
    let mut m = manifest.clone();
    m.core.chunks += 1;
    let err = check(
        &mut b,
        vec![
            (SNAPSHOT_MANIFEST.into(), serde_json::to_vec(&m).unwrap()),
            (SNAPSHOT_LOG.into(), log.clone()),
        ],
        None,
    );
    assert!(matches!(err, SnapshotError::HashMismatch { .. }), "{err}");

    // A consistent manifest for a different content (hash recomputed by the attacker) fails the
    // content check.
    let mut m = manifest.clone();
    m.core.chunks += 1;
    m.kb_hash = m.core.hash().to_hex();
    let err = check(
        &mut b,
        vec![
            (SNAPSHOT_MANIFEST.into(), serde_json::to_vec(&m).unwrap()),
            (SNAPSHOT_LOG.into(), log.clone()),
        ],
        None,
    );
    assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");

    // A genuine archive, but not the one the caller asked for.
    let wrong = ContentHash::of(b"another knowledge base");
    let err = check(&mut b, original.clone(), Some(&wrong));
    assert!(matches!(err, SnapshotError::HashMismatch { .. }), "{err}");

    // Extra entries, missing entries, truncation, garbage.
    let err = check(
        &mut b,
        vec![
            original[0].clone(),
            original[1].clone(),
            ("extra".into(), b"x".to_vec()),
        ],
        None,
    );
    assert!(matches!(err, SnapshotError::NotASnapshot { .. }), "{err}");
    let err = check(&mut b, vec![original[0].clone()], None);
    assert!(matches!(err, SnapshotError::NotASnapshot { .. }), "{err}");
    let err = check(&mut b, vec![original[1].clone(), original[0].clone()], None);
    assert!(matches!(err, SnapshotError::NotASnapshot { .. }), "{err}");
    let truncated = out.path().join("truncated.tar");
    let bytes = fs::read(&archive).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(b.import_snapshot(&truncated, None).is_err());
    fs::write(&truncated, b"definitely not a tar archive").unwrap();
    assert!(b.import_snapshot(&truncated, None).is_err());
    assert_eq!(b.hash(), before);

    // No temporary files are left behind, and the knowledge base still opens cleanly.
    drop(b);
    let leftovers: Vec<String> = fs::read_dir(b_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let b = open(b_dir.path());
    assert_eq!(b.hash(), before);
    // The genuine archive still imports.
    let mut b = b;
    b.import_snapshot(&archive, Some(&a.hash())).unwrap();
    assert_eq!(b.hash(), a.hash());
}
