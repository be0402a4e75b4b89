//! The crash test: a helper process runs a deterministic workload (ingest, replace, remove,
//! checkpoint, compact) and prints `ACK <n>` once operation `n` is durable; it is killed with
//! SIGKILL at random moments, and after each kill the knowledge base must hold every
//! acknowledged document completely, and no partial document, and every chunk of the documents
//! checked must be found by its own vector.
//!
//! The kill delays come from a seeded generator; the seed is printed first, so a failing run's
//! delays can be replayed with `GAIA_CRASH_SEED=<seed>` (the moments the kills land still depend
//! on the machine's speed). `GAIA_CRASH_KILLS=<n>` runs `n` kills with no time limit: the stress
//! run is `GAIA_CRASH_KILLS=500 cargo test --release -p gaia-knowledge --test it crash::
//! -- --nocapture` (see `knowledge/stress.sh`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gaia_knowledge::testing::ToyEmbedder;
use gaia_knowledge::testing::crash::{self, CrashOp};
use gaia_knowledge::{ContentHash, KnowledgeBase, SearchMode, SearchQuery, no_progress};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::open;

/// Expected state of each document: `Some(version)` or removed.
type Expected = HashMap<u64, Option<u32>>;

fn apply(state: &mut Expected, op: CrashOp) {
    match op {
        CrashOp::Put { id, version } => {
            state.insert(id, Some(version));
        }
        CrashOp::Remove { id } => {
            state.insert(id, None);
        }
        CrashOp::Checkpoint | CrashOp::Compact => {}
    }
}

/// The document digest a complete copy of `(id, version)` has, computed once in a scratch KB.
struct Digests {
    kb: KnowledgeBase,
    _dir: tempfile::TempDir,
    cache: HashMap<(u64, u32), ContentHash>,
}

impl Digests {
    fn get(&mut self, id: u64, version: u32) -> ContentHash {
        if let Some(d) = self.cache.get(&(id, version)) {
            return *d;
        }
        let source = crash::source(id);
        let text = crash::document(id, version);
        self.kb
            .ingest_bytes(
                text.as_bytes(),
                &source,
                Some("text/markdown"),
                &mut no_progress,
            )
            .unwrap();
        let digest = self.kb.source(&source).unwrap().digest;
        self.cache.insert((id, version), digest);
        digest
    }
}

/// Checks the KB against the acknowledged state; the operation right after the last
/// acknowledgement may or may not have become durable.
fn verify(
    kb: &KnowledgeBase,
    acked: &Expected,
    next_op: u64,
    digests: &mut Digests,
    rng: &mut StdRng,
) {
    let mut with_next = acked.clone();
    let pending = crash::op(next_op);
    apply(&mut with_next, pending);
    let present: Vec<String> = kb.list_sources().into_iter().map(|s| s.source).collect();
    let known: std::collections::HashSet<String> =
        with_next.keys().map(|id| crash::source(*id)).collect();
    for source in &present {
        assert!(known.contains(source), "unexpected document {source}");
    }
    for id in with_next.keys() {
        let source = crash::source(*id);
        let actual = kb.source(&source).map(|s| s.digest);
        // Never acknowledged or removed both mean absent.
        let before = acked.get(id).copied().flatten();
        let after = with_next.get(id).copied().flatten();
        let allowed = [
            before.map(|v| digests.get(*id, v)),
            after.map(|v| digests.get(*id, v)),
        ];
        assert!(
            allowed.contains(&actual),
            "document {id}: found {actual:?}, allowed {allowed:?} (pending op {pending:?})"
        );
    }
    // The indexes agree with the documents.
    let chunks: usize = kb.list_sources().iter().map(|s| s.chunks).sum();
    let info = kb.info();
    assert_eq!(info.chunks, chunks);
    assert_eq!(
        info.vectors, chunks,
        "the vector index holds stale or missing vectors"
    );
    let Some(last) = present.last() else {
        return;
    };
    let id_of = |source: &str| -> u64 {
        source
            .trim_start_matches("crash/doc-")
            .trim_end_matches(".md")
            .parse()
            .unwrap()
    };
    let id = id_of(last);
    let version = match kb.source(last).map(|s| s.digest) {
        Some(d) if d == digests.get(id, 1) => 1,
        Some(d) if d == digests.get(id, 2) => 2,
        _ => 3,
    };
    let marker = format!("marker{id}v{version}");
    let hits = kb
        .search(
            &SearchQuery::new(&marker)
                .mode(SearchMode::Keyword)
                .top_k(50),
        )
        .unwrap();
    assert!(
        !hits.is_empty() && hits.iter().all(|h| &h.source == last),
        "keyword index out of step"
    );
    // Each chunk's own vector finds that very chunk: the last document and up to 16 others.
    let embedder = ToyEmbedder::new();
    let mut checked: Vec<&String> = vec![last];
    for _ in 0..16.min(present.len()) {
        checked.push(&present[rng.gen_range(0..present.len())]);
    }
    for source in checked {
        for text in kb.source_chunks(source).unwrap() {
            let hits = kb
                .search_by_vector(&embedder.vector(&text), 3, None)
                .unwrap();
            assert!(
                hits.iter().any(|h| h.text == text && h.score > 0.999),
                "vector index out of step: searching {source} found {:?}",
                hits.iter()
                    .map(|h| (&h.source, h.ordinal, h.score))
                    .collect::<Vec<_>>()
            );
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

#[test]
fn acknowledged_documents_survive_sigkill_at_random_moments() {
    let helper = env!("CARGO_BIN_EXE_kb-crash-helper");
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut digests = Digests {
        kb: open(scratch.path()),
        _dir: scratch,
        cache: HashMap::new(),
    };
    let mut acked: Expected = HashMap::new();
    let mut next_op = 0u64;
    let seed = env_u64("GAIA_CRASH_SEED").unwrap_or_else(|| rand::thread_rng().r#gen());
    // Printed first, so that a failure's output names it.
    eprintln!("crash test seed {seed} (replay with GAIA_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let stress = env_u64("GAIA_CRASH_KILLS");
    let (max_kills, budget) = match stress {
        Some(n) => (n, Duration::MAX),
        None => (80, Duration::from_secs(45)),
    };
    let started = Instant::now();
    let mut kills = 0;
    let mut mid_run_kills = 0;
    while kills < max_kills && started.elapsed() < budget {
        let mut child = Command::new(helper)
            .arg(dir.path())
            .arg(next_op.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kb-crash-helper");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::sync_channel::<u64>(1 << 16);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ACK ")
                    && tx.send(n.parse().unwrap()).is_err()
                {
                    break;
                }
            }
        });
        // Mostly short delays (kills during open, recovery or the first writes), sometimes
        // longer ones (kills in the middle of a busy run).
        let delay = if rng.gen_bool(0.25) {
            rng.gen_range(0..20)
        } else {
            rng.gen_range(20..250)
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().expect("SIGKILL the helper");
        let status = child.wait().unwrap();
        reader.join().unwrap();
        if let Some(code) = status.code() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the helper exited by itself with {code}: {err}");
        }
        kills += 1;
        let acks: Vec<u64> = rx.try_iter().collect();
        for n in &acks {
            assert_eq!(*n, next_op, "acknowledgements arrive in order");
            apply(&mut acked, crash::op(*n));
            next_op += 1;
        }
        if !acks.is_empty() {
            mid_run_kills += 1;
        }
        let kb = open(dir.path());
        verify(&kb, &acked, next_op, &mut digests, &mut rng);
        drop(kb);
    }
    eprintln!(
        "crash test (seed {seed}): {kills} kills ({mid_run_kills} after some acknowledgements), {next_op} operations acknowledged, {} documents, {:.1} s",
        acked.values().filter(|v| v.is_some()).count(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        kills >= 50.min(max_kills),
        "only {kills} kills in the time budget"
    );
    assert!(next_op >= 50, "too little progress: {next_op} operations");
    assert!(
        mid_run_kills >= 20,
        "too few kills hit a running workload: {mid_run_kills}"
    );
}
