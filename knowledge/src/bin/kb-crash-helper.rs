//! Helper of the crash test: runs the deterministic workload of
//! `gaia_knowledge::testing::crash` against a knowledge base and prints `ACK <n>` after operation
//! `n` is durable, until it is killed.
//!
//! Usage: `kb-crash-helper <kb-dir> <first-op>`

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use gaia_knowledge::testing::ToyEmbedder;
use gaia_knowledge::testing::crash::{self, CrashOp};
use gaia_knowledge::{KbOptions, KnowledgeBase, no_progress};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: kb-crash-helper <kb-dir> <first-op>")?,
    );
    let first: u64 = args.next().ok_or("missing <first-op>")?.parse()?;
    let options = KbOptions {
        checkpoint_every_chunks: 40,
        ..KbOptions::default()
    };
    let mut kb = KnowledgeBase::open(&dir, Arc::new(ToyEmbedder::new()), options)?;
    let stdout = std::io::stdout();
    for n in first.. {
        match crash::op(n) {
            CrashOp::Put { id, version } => {
                let text = crash::document(id, version);
                kb.ingest_bytes(
                    text.as_bytes(),
                    &crash::source(id),
                    Some("text/markdown"),
                    &mut no_progress,
                )?;
            }
            CrashOp::Remove { id } => {
                kb.remove_source(&crash::source(id))?;
            }
            CrashOp::Checkpoint => kb.checkpoint()?,
            CrashOp::Compact => {
                kb.compact()?;
            }
        }
        let mut out = stdout.lock();
        writeln!(out, "ACK {n}")?;
        out.flush()?;
    }
    Ok(())
}
