//! The prefix cache: the KV state of finished generations, kept within a memory budget and
//! reused by later requests whose prompt starts with the same tokens.
//!
//! A chat's next turn sends the whole conversation again: its prompt starts with the previous
//! turn's prompt and answer, whose keys and values the previous generation computed. Requests
//! of different users share the system prompt, and retrieval puts the same context in front of
//! many questions. [`PrefixCache::take`] finds the cached sequence that shares the longest
//! prefix with a new prompt; the generation then runs only the rest of the prompt.
//!
//! - An entry that the new prompt continues (it loses at most an eighth of its positions, a
//!   conversation's next turn) is taken out and truncated: no copy, and the conversation's
//!   state moves on with it.
//! - Otherwise the shared positions are copied into a new sequence (a system prompt shared
//!   by many users: copying a position costs a few microseconds, running it about a
//!   millisecond) and the entry stays for the next user.
//! - A finished generation's sequence goes back with [`PrefixCache::put`]; entries it extends
//!   are dropped (it holds all they held), and the least recently used entries go when the
//!   budget is exceeded.
//!
//! The reused state is exactly what running the prefix again would compute: a position's
//! keys and values depend only on the tokens up to it, and the kernels compute each row
//! alone.

use crate::llm::Sequence;

/// The fewest positions worth reusing.
const MIN_REUSE: usize = 1;

/// What the cache holds and did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefixStats {
    /// Prompts looked up.
    pub lookups: u64,
    /// Lookups that reused some positions.
    pub hits: u64,
    /// Prompt tokens looked up.
    pub prompt_tokens: u64,
    /// Prompt tokens reused instead of run.
    pub reused_tokens: u64,
    /// Entries dropped to stay within the budget.
    pub evictions: u64,
    /// Entries held.
    pub entries: usize,
    /// Bytes of KV state held.
    pub bytes: usize,
    /// The budget in bytes (0: the cache is off).
    pub budget: usize,
}

struct Entry {
    /// The tokens whose state `seq` holds (`tokens.len() == seq.len()`).
    tokens: Vec<u32>,
    seq: Sequence,
    bytes: usize,
    /// When it was last used (the cache's clock).
    used: u64,
}

/// Finished generations' KV state; see the [module documentation](self).
pub struct PrefixCache {
    budget: usize,
    entries: Vec<Entry>,
    clock: u64,
    stats: PrefixStats,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("stats", &self.stats())
            .finish()
    }
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// An empty cache that holds at most `budget` bytes (0 turns it off).
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache {
            budget,
            entries: Vec::new(),
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    /// What it holds and did.
    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            entries: self.entries.len(),
            bytes: self.bytes(),
            budget: self.budget,
            ..self.stats
        }
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// The state of the longest cached prefix of `prompt`, leaving at least its last token to
    /// run (the generation needs its logits): a sequence holding the first `n` positions and
    /// `n`, or `None` when nothing useful is cached.
    pub fn take(&mut self, prompt: &[u32]) -> Option<(Sequence, usize)> {
        self.stats.lookups += 1;
        self.stats.prompt_tokens += prompt.len() as u64;
        let usable = prompt.len().saturating_sub(1);
        let (best, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, &prompt[..usable])))
            .max_by_key(|&(i, n)| (n, self.entries[i].used))?;
        if shared < MIN_REUSE {
            return None;
        }
        self.clock += 1;
        self.stats.hits += 1;
        self.stats.reused_tokens += shared as u64;
        let entry = &mut self.entries[best];
        let seq = if shared * 8 >= entry.tokens.len() * 7 {
            let mut entry = self.entries.swap_remove(best);
            entry.seq.truncate(shared);
            entry.seq
        } else {
            entry.used = self.clock;
            entry.seq.fork(shared)
        };
        Some((seq, shared))
    }

    /// Keeps `seq`, which holds the state of `tokens` (only its first `seq.len()` count).
    pub fn put(&mut self, mut tokens: Vec<u32>, mut seq: Sequence) {
        if self.budget == 0 || seq.is_empty() {
            return;
        }
        tokens.truncate(seq.len());
        if tokens.len() < seq.len() {
            // The caller lost track of what the sequence holds: nothing to match it by.
            return;
        }
        seq.release_scratch();
        let bytes = seq.cache_bytes();
        if bytes > self.budget {
            return;
        }
        // Entries this one extends hold nothing it does not.
        self.entries
            .retain(|e| common_prefix(&e.tokens, &tokens) < e.tokens.len());
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            seq,
            bytes,
            used: self.clock,
        });
        self.evict();
    }

    /// Drops the least recently used entries until the budget holds.
    fn evict(&mut self) {
        let mut bytes = self.bytes();
        while bytes > self.budget {
            let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) else {
                break;
            };
            bytes -= self.entries.swap_remove(oldest).bytes;
            self.stats.evictions += 1;
        }
    }
}
