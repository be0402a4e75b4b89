//! Bad input gets a clear error each time, and nothing already stored is lost.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gaia_knowledge::testing::{ToyEmbedder, encrypted_pdf, minimal_pdf};
use gaia_knowledge::{
    EmbedError, Embedder, ExtractError, IngestError, IngestPolicy, KbOptions, KnowledgeBase,
    no_progress,
};

use crate::open_with;

fn extract_error(result: Result<gaia_knowledge::IngestedDocument, IngestError>) -> ExtractError {
    match result {
        Err(IngestError::Extract { error, .. }) => error,
        other => panic!("expected an extraction error, got {other:?}"),
    }
}

#[test]
fn every_kind_of_bad_file_is_refused_clearly_and_nothing_is_lost() {
    let kb_dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let options = KbOptions {
        max_document_bytes: 64 * 1024,
        ..KbOptions::default()
    };
    let mut kb = open_with(kb_dir.path(), ToyEmbedder::new(), options);
    kb.ingest_bytes(
        b"# Precious\n\nThis document must survive.",
        "precious.md",
        None,
        &mut no_progress,
    )
    .unwrap();
    let before = kb.hash();
    let policy = IngestPolicy::new(root.path());
    let p = |name: &str| root.path().join(name);

    // Binary data with a text extension.
    fs::write(p("program.txt"), b"\x7fELF\x02\x01\x01\0\0\0\0\0binary").unwrap();
    let err = extract_error(kb.ingest_file(&p("program.txt"), &policy, &mut no_progress));
    assert!(matches!(err, ExtractError::Binary));
    assert!(err.to_string().contains("binary file"));

    // Latin-1 text.
    fs::write(
        p("latin.txt"),
        b"cr\xe8me br\xfbl\xe9e \xe0 la fran\xe7aise",
    )
    .unwrap();
    assert!(matches!(
        extract_error(kb.ingest_file(&p("latin.txt"), &policy, &mut no_progress)),
        ExtractError::NotUtf8
    ));

    // Too large.
    fs::write(p("huge.md"), vec![b'a'; 65 * 1024]).unwrap();
    let err = kb
        .ingest_file(&p("huge.md"), &policy, &mut no_progress)
        .unwrap_err();
    assert!(
        matches!(err, IngestError::TooLarge { limit: 65536, .. }),
        "{err}"
    );
    assert!(
        kb.ingest_bytes(&vec![b'a'; 65 * 1024], "big.txt", None, &mut no_progress)
            .is_err()
    );

    // Encrypted and corrupt PDFs.
    fs::write(
        p("locked.pdf"),
        encrypted_pdf("top secret plans", "hunter2"),
    )
    .unwrap();
    let err = extract_error(kb.ingest_file(&p("locked.pdf"), &policy, &mut no_progress));
    assert!(matches!(err, ExtractError::PdfEncrypted));
    assert!(err.to_string().contains("password"));
    let pdf = minimal_pdf(&["fine text"]);
    fs::write(p("broken.pdf"), &pdf[..pdf.len() / 3]).unwrap();
    assert!(matches!(
        extract_error(kb.ingest_file(&p("broken.pdf"), &policy, &mut no_progress)),
        ExtractError::PdfCorrupt(_)
    ));
    fs::write(p("fake.pdf"), b"%PDF-1.7\nnothing else").unwrap();
    assert!(matches!(
        extract_error(kb.ingest_file(&p("fake.pdf"), &policy, &mut no_progress)),
        ExtractError::PdfCorrupt(_)
    ));

    // Empty documents.
    fs::write(p("blank.md"), b"   \n\n  ").unwrap();
    assert!(matches!(
        extract_error(kb.ingest_file(&p("blank.md"), &policy, &mut no_progress)),
        ExtractError::Empty
    ));

    // Paths outside the root: by `..`, absolute, and through a symlink.
    fs::write(outside.path().join("secret.md"), b"# Secret").unwrap();
    let escape = root
        .path()
        .join("..")
        .join(outside.path().file_name().unwrap())
        .join("secret.md");
    assert!(matches!(
        kb.ingest_file(&escape, &policy, &mut no_progress),
        Err(IngestError::OutsideRoot { .. })
    ));
    assert!(matches!(
        kb.ingest_file(&outside.path().join("secret.md"), &policy, &mut no_progress),
        Err(IngestError::OutsideRoot { .. })
    ));
    std::os::unix::fs::symlink(outside.path().join("secret.md"), p("link.md")).unwrap();
    let err = kb
        .ingest_file(&p("link.md"), &policy, &mut no_progress)
        .unwrap_err();
    assert!(matches!(err, IngestError::OutsideRoot { .. }), "{err}");
    assert!(err.to_string().contains("outside the allowed directory"));
    std::os::unix::fs::symlink(outside.path(), p("linkdir")).unwrap();
    assert!(matches!(
        kb.ingest_path(&p("linkdir"), &policy, &mut no_progress),
        Err(IngestError::OutsideRoot { .. })
    ));

    // Unreadable: missing files, dangling links, a directory given as a file.
    assert!(matches!(
        kb.ingest_file(&p("missing.md"), &policy, &mut no_progress),
        Err(IngestError::Unreadable { .. })
    ));
    std::os::unix::fs::symlink(p("nowhere"), p("dangling.md")).unwrap();
    assert!(matches!(
        kb.ingest_file(&p("dangling.md"), &policy, &mut no_progress),
        Err(IngestError::Unreadable { .. })
    ));
    fs::create_dir(p("adir.md")).unwrap();
    assert!(matches!(
        kb.ingest_file(&p("adir.md"), &policy, &mut no_progress),
        Err(IngestError::NotAFile { .. })
    ));

    // Bytes with a bad type or name.
    let err = kb
        .ingest_bytes(
            b"\x89PNG\r\n",
            "https://x.org/a.png",
            Some("image/png"),
            &mut no_progress,
        )
        .unwrap_err();
    assert!(matches!(err, IngestError::Unsupported { .. }), "{err}");
    assert!(matches!(
        kb.ingest_bytes(b"text", "", None, &mut no_progress),
        Err(IngestError::InvalidSource { .. })
    ));
    assert!(matches!(
        kb.ingest_bytes(b"text", "a\0b", None, &mut no_progress),
        Err(IngestError::InvalidSource { .. })
    ));

    // A directory walk reports every bad file and ingests the good one.
    fs::write(p("good.md"), b"# Good\n\nA fine document about otters.").unwrap();
    let report = kb
        .ingest_path(root.path(), &policy, &mut no_progress)
        .unwrap();
    let stored: Vec<&str> = report.documents.iter().map(|d| d.source.as_str()).collect();
    assert_eq!(stored, vec!["good.md"]);
    let failed: Vec<String> = report
        .failed
        .iter()
        .map(|(path, _)| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for name in [
        "program.txt",
        "latin.txt",
        "huge.md",
        "locked.pdf",
        "broken.pdf",
        "fake.pdf",
        "blank.md",
        "link.md",
        "linkdir",
        "dangling.md",
    ] {
        assert!(
            failed.iter().any(|f| f == name),
            "{name} not reported: {failed:?}"
        );
    }
    for (_, error) in &report.failed {
        let message = error.to_string();
        assert!(
            !message.is_empty() && !message.chars().next().unwrap().is_uppercase(),
            "{message}"
        );
    }

    // Nothing stored before was touched.
    kb.remove_source("good.md").unwrap();
    assert_eq!(kb.hash(), before);
    assert_eq!(
        kb.source_chunks("precious.md").unwrap(),
        vec!["# Precious\n\nThis document must survive."]
    );
}

/// An embedder that fails or misbehaves on demand.
struct Flaky {
    inner: ToyEmbedder,
    fail: AtomicBool,
    nan: AtomicBool,
}

impl Embedder for Flaky {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }
    fn model_digest(&self) -> &str {
        self.inner.model_digest()
    }
    fn dimensions(&self) -> usize {
        self.inner.dimensions()
    }
    fn max_input_tokens(&self) -> Option<usize> {
        self.inner.max_input_tokens()
    }
    fn count_tokens(&self, text: &str) -> usize {
        self.inner.count_tokens(text)
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(EmbedError::Model("out of memory".into()));
        }
        let mut out = self.inner.embed(texts)?;
        if self.nan.load(Ordering::SeqCst) {
            out[0][0] = f32::NAN;
        }
        Ok(out)
    }
}

#[test]
fn embedder_failures_are_reported_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(Flaky {
        inner: ToyEmbedder::new(),
        fail: AtomicBool::new(false),
        nan: AtomicBool::new(false),
    });
    let mut kb = KnowledgeBase::open(dir.path(), flaky.clone(), KbOptions::default()).unwrap();
    kb.ingest_bytes(b"kept", "kept.txt", None, &mut no_progress)
        .unwrap();
    let before = kb.hash();
    flaky.fail.store(true, Ordering::SeqCst);
    let err = kb
        .ingest_bytes(b"new text", "new.txt", None, &mut no_progress)
        .unwrap_err();
    assert!(matches!(err, IngestError::Embed { .. }));
    assert!(err.to_string().contains("out of memory"));
    assert!(
        kb.search(&gaia_knowledge::SearchQuery::new("kept"))
            .is_err()
    );
    flaky.fail.store(false, Ordering::SeqCst);
    flaky.nan.store(true, Ordering::SeqCst);
    let err = kb
        .ingest_bytes(b"new text", "new.txt", None, &mut no_progress)
        .unwrap_err();
    assert!(matches!(err, IngestError::BadVector { .. }), "{err}");
    flaky.nan.store(false, Ordering::SeqCst);
    assert_eq!(kb.hash(), before);
    kb.ingest_bytes(b"new text", "new.txt", None, &mut no_progress)
        .unwrap();
    assert_eq!(kb.list_sources().len(), 2);
}

#[test]
fn a_file_that_grows_past_the_limit_while_read_is_refused() {
    // The size is checked on the bytes actually read, not only on the metadata.
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let options = KbOptions {
        max_document_bytes: 10,
        ..KbOptions::default()
    };
    let mut kb = open_with(dir.path(), ToyEmbedder::new(), options);
    fs::write(root.path().join("a.txt"), b"0123456789").unwrap();
    kb.ingest_file(
        &root.path().join("a.txt"),
        &IngestPolicy::new(root.path()),
        &mut no_progress,
    )
    .unwrap();
    fs::write(root.path().join("b.txt"), b"0123456789a").unwrap();
    assert!(matches!(
        kb.ingest_file(
            &root.path().join("b.txt"),
            &IngestPolicy::new(root.path()),
            &mut no_progress
        ),
        Err(IngestError::TooLarge { .. })
    ));
}
