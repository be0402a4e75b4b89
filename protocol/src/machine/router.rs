//! Routing: which node of the domain serves a request.
//!
//! The [`Router`] is a small sans-IO machine: [`Router::choose`] is a query, and
//! [`Router::observe`] feeds it what this node saw of earlier requests.
//!
//! # Choosing
//!
//! The candidates are the domain's routable members (from
//! [`Membership::candidates`](super::membership::Membership::candidates)), the local node
//! among them when it serves a model. For a request with [`Needs`]:
//!
//! 1. **Filter.** A candidate qualifies when it serves the requested model name, offers tool
//!    calls and structured output if the request uses them, has a context window of at least
//!    the request's minimum, is not excluded by the caller (nodes that already failed this
//!    request) and is not banned.
//! 2. **Power of two choices.** Two distinct qualifying candidates are drawn at random (from
//!    the router's [`SeededRng`], so the choice is reproducible) and the one with the lower
//!    score wins. Drawing two and keeping the better spreads load almost as evenly as scanning
//!    for the least loaded node, without sending every entry node's requests to the same
//!    "least loaded" node between two adverts. [`Router::choose_in`] draws the two by position
//!    from the membership table (a few draws instead of a pass over a table of a thousand),
//!    falling back to [`Router::choose`]'s pass when few candidates qualify.
//! 3. **Score** (lower is better), roughly the expected wait:
//!    `(1 + advertised in_flight + advertised queued + local in_flight) ×
//!    (1 + latency EWMA / latency_scale)`. The advertised load is up to one heartbeat old; the
//!    local in-flight count (requests this node sent there and that have not ended) corrects
//!    it between adverts. The latency is the exponentially weighted mean time to first token
//!    this node measured; a node never measured scores as if it answered in
//!    `unknown_latency_ms` (default 0, so new nodes get tried), the time a request sent there
//!    has been waiting for its first token counts as its latency while it waits, and a failure counts as a sample of `failure_latency_ms`, so a node that
//!    fails or never answers (a self-made identity advertising no load) scores as slow once
//!    its ban ends. A measured latency fades back towards the unknown one while no new sample
//!    comes (its excess halves every `latency_half_life_ms`), so a node that failed or was
//!    slow once is tried again in time even in an idle domain.
//!
//! 4. **Prefix affinity.** A chat's turns share a growing prefix, and the node that served the
//!    last turn holds its KV state in its prefix cache: sending the next turn there saves the
//!    prefill of the whole history. The request carries a [`Conversation`]: keys of its
//!    message prefixes. The router remembers which node it chose for each request's whole
//!    conversation (a bounded table, entries expire after `affinity_ttl_ms`), and for a new
//!    request it looks up the longest prefix it remembers. That node is chosen instead of
//!    the power-of-two winner when it qualifies and its load (the `1 + …` factor of the
//!    score) is at most `affinity_slack` times the winner's, so affinity never piles a
//!    domain's chats onto a busy node. The latency factor is left out of this comparison:
//!    it would count against the node that holds the conversation the prefill time that
//!    affinity saves.
//!
//! # Observing
//!
//! [`Observation`]s keep the per-node statistics: `Dispatched` and the end of a request
//! (`Succeeded`, `Failed`, `Released`) move the in-flight count, `FirstToken` the latency mean.
//! A failure bans the node for `ban_base_ms`, doubling with every consecutive failure up to
//! `ban_max_ms` (as Petals bans failing servers); a success clears the ban and the count. The
//! statistics table is bounded: beyond `max_tracked_peers`, the idle entry used least recently
//! is forgotten.

use std::collections::HashMap;
use std::fmt;

use crate::NodeId;
use crate::advert::{Advert, Capabilities, Load};
use crate::payment::Price;

use super::{Millis, SeededRng};

/// What a request needs from the node that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Needs {
    /// The model name the client asked for (the OpenAI `model` field), compared exactly with
    /// the adverts' `model_name`; `None` accepts any model the domain serves.
    pub model: Option<String>,
    /// The request offers tools.
    pub tools: bool,
    /// The request asks for constrained output (`response_format`, a grammar).
    pub structured_output: bool,
    /// The smallest context window that fits the request (prompt plus `max_tokens`), in tokens.
    pub min_context: u32,
    /// The most the request may be charged (a paid request); `None` for a request nobody
    /// pays for, which any node may serve.
    pub max_price: Option<Price>,
    /// The conversation the request continues, for prefix affinity; empty for none.
    pub conversation: Conversation,
}

/// The most message prefixes of a [`Conversation`] looked up.
pub const MAX_PREFIXES: usize = 64;

/// A request's conversation, as keys of its message prefixes: what the router needs to send
/// a chat's next turn to the node that holds its history (see the
/// [module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conversation {
    /// Keys of the request's messages without the last one, without the last two, and so
    /// on: its earlier states, longest first (at most [`MAX_PREFIXES`]).
    pub prefixes: Vec<u64>,
    /// The key of all the request's messages, remembered against the node chosen.
    pub whole: Option<u64>,
}

impl Conversation {
    /// The conversation of a request with these messages, each in a canonical encoding (the
    /// same bytes for the same message on every turn). The key of a prefix is a chained
    /// SHA-256 of its messages, so equal keys mean equal prefixes.
    pub fn of<'m>(messages: impl IntoIterator<Item = &'m [u8]>) -> Self {
        use sha2::{Digest as _, Sha256};
        let mut chain = [0u8; 32];
        let mut keys = Vec::new();
        for message in messages {
            let mut hasher = Sha256::new();
            hasher.update(chain);
            hasher.update((message.len() as u64).to_le_bytes());
            hasher.update(message);
            chain = hasher.finalize().into();
            let mut key = [0u8; 8];
            key.copy_from_slice(&chain[..8]);
            keys.push(u64::from_le_bytes(key));
        }
        let whole = keys.pop();
        keys.reverse();
        keys.truncate(MAX_PREFIXES);
        Self {
            prefixes: keys,
            whole,
        }
    }
}

/// Which node the router chose for recent conversations: two generations of a map, the
/// older dropped when the newer fills half the capacity (an LRU in constant time per insert).
#[derive(Debug, Clone, Default)]
struct Affinity {
    current: HashMap<u64, (NodeId, Millis)>,
    previous: HashMap<u64, (NodeId, Millis)>,
}

impl Affinity {
    /// The node chosen for the longest of `prefixes` remembered and not expired at `now`.
    fn lookup(&self, now: Millis, ttl_ms: u64, prefixes: &[u64]) -> Option<NodeId> {
        prefixes.iter().find_map(|key| {
            self.current
                .get(key)
                .or_else(|| self.previous.get(key))
                .filter(|(_, at)| now.since(*at) <= ttl_ms)
                .map(|(node, _)| *node)
        })
    }

    fn remember(&mut self, now: Millis, capacity: usize, key: u64, node: NodeId) {
        if self.current.len() >= capacity.div_ceil(2) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, (node, now));
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// One node that could serve a request, as its advert describes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate<'a> {
    /// The node.
    pub node: NodeId,
    /// The model name it serves.
    pub model_name: &'a str,
    /// What its model can do.
    pub capabilities: &'a Capabilities,
    /// How busy it said it was.
    pub load: &'a Load,
    /// What it asks.
    pub price: Price,
}

impl<'a> Candidate<'a> {
    /// The candidate an advert describes.
    pub fn from_advert(advert: &'a Advert) -> Self {
        Self {
            node: advert.node,
            model_name: &advert.model_name,
            capabilities: &advert.capabilities,
            load: &advert.load,
            price: advert.price(),
        }
    }
}

/// What this node saw of a request sent to `node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A request was sent to `node`.
    Dispatched {
        /// The node.
        node: NodeId,
    },
    /// `node` sent the first token `latency_ms` after the request was sent.
    FirstToken {
        /// The node.
        node: NodeId,
        /// Time to first token, in milliseconds.
        latency_ms: u64,
    },
    /// The request on `node` completed: its ban and failure count are cleared.
    Succeeded {
        /// The node.
        node: NodeId,
    },
    /// The request on `node` failed through the node's fault (unreachable, broken stream,
    /// timeout, internal error): it is banned with exponential backoff.
    Failed {
        /// The node.
        node: NodeId,
    },
    /// The request on `node` ended without a verdict on the node (the client left, or the
    /// request itself was refused as invalid).
    Released {
        /// The node.
        node: NodeId,
    },
}

/// Tuning of the [`Router`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The first ban of a failing node, in milliseconds. Default 2 000.
    pub ban_base_ms: u64,
    /// The longest ban, in milliseconds. Default 300 000 (5 minutes).
    pub ban_max_ms: u64,
    /// Weight of the newest latency sample in the mean, in (0, 1]. Default 0.2.
    pub latency_alpha: f64,
    /// The latency that doubles a node's score, in milliseconds. Default 500.
    pub latency_scale_ms: f64,
    /// The most nodes with statistics. Default 16 384.
    pub max_tracked_peers: usize,
    /// A failure counts as a first-token latency sample of this many milliseconds, so a
    /// node that fails (or never answers) scores as slow once its ban ends, instead of as
    /// the unknown, idle node it claims to be. Default 4 000.
    pub failure_latency_ms: f64,
    /// The first-token latency assumed of a node this node never measured. Default 0: a new
    /// node is tried at once (simulated 20 % self-made identities got no fewer dispatches with
    /// 1 000 to 4 000, and a new honest node got none next to a measured fast one).
    pub unknown_latency_ms: f64,
    /// How fast a measured latency fades back towards `unknown_latency_ms` while no new
    /// sample comes: its excess halves every this many milliseconds. A node that failed or
    /// was slow once is tried again in time even while the domain is idle (without it, a
    /// node that failed once lost every comparison with an idle one for good). Default
    /// 30 000.
    pub latency_half_life_ms: u64,
    /// Prefix affinity: a chat's next turn goes to the node chosen for its earlier turns
    /// while that node's load is at most this many times the best other choice's. Default 2;
    /// 0 turns affinity off.
    pub affinity_slack: f64,
    /// How long the router remembers which node served a conversation, in milliseconds
    /// (about as long as a node keeps a prefix in its cache). Default 600 000.
    pub affinity_ttl_ms: u64,
    /// The most conversations remembered. Default 16 384.
    pub max_affinity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ban_base_ms: 2_000,
            ban_max_ms: 300_000,
            latency_alpha: 0.2,
            latency_scale_ms: 500.0,
            max_tracked_peers: 16_384,
            failure_latency_ms: 4_000.0,
            unknown_latency_ms: 0.0,
            latency_half_life_ms: 30_000,
            affinity_slack: 2.0,
            affinity_ttl_ms: 600_000,
            max_affinity: 16_384,
        }
    }
}

/// The router's configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid router configuration: {0}")]
pub struct ConfigError(&'static str);

impl Config {
    fn check(&self) -> Result<(), ConfigError> {
        if self.ban_base_ms == 0 || self.ban_max_ms < self.ban_base_ms {
            return Err(ConfigError(
                "ban_base_ms must be at least 1 and ban_max_ms at least ban_base_ms",
            ));
        }
        if !(self.latency_alpha > 0.0 && self.latency_alpha <= 1.0) {
            return Err(ConfigError("latency_alpha must be in (0, 1]"));
        }
        if !(self.latency_scale_ms.is_finite() && self.latency_scale_ms > 0.0) {
            return Err(ConfigError(
                "latency_scale_ms must be a positive finite number",
            ));
        }
        if self.latency_half_life_ms == 0 {
            return Err(ConfigError("latency_half_life_ms must be at least 1"));
        }
        if !(self.affinity_slack.is_finite() && self.affinity_slack >= 0.0) {
            return Err(ConfigError(
                "affinity_slack must be a finite number of at least 0",
            ));
        }
        if self.max_affinity == 0 {
            return Err(ConfigError("max_affinity must be at least 1"));
        }
        if self.max_tracked_peers == 0 {
            return Err(ConfigError("max_tracked_peers must be at least 1"));
        }
        if !(self.failure_latency_ms.is_finite()
            && self.failure_latency_ms >= 0.0
            && self.unknown_latency_ms.is_finite()
            && self.unknown_latency_ms >= 0.0)
        {
            return Err(ConfigError(
                "failure_latency_ms and unknown_latency_ms must be finite numbers of at least 0",
            ));
        }
        Ok(())
    }
}

/// What this node knows of one peer from its own requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerStats {
    /// Requests sent there that have not ended.
    pub in_flight: u32,
    /// Mean time to first token, in milliseconds, as of `sampled_at`; `None` until measured.
    pub latency_ms: Option<f64>,
    /// When the last latency sample (a first token or a failure) came.
    pub sampled_at: Millis,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// Banned until this time (no ban when in the past).
    pub banned_until: Millis,
    /// The last time an observation touched this entry.
    pub last_used: Millis,
    /// Since when a request sent there has been waiting for its first token (`None` when
    /// none is); the wait counts as latency, so a node that holds requests without answering
    /// looks slow before the first-token timeout proves it dead.
    pub waiting_since: Option<Millis>,
}

impl PeerStats {
    fn is_banned(&self, now: Millis) -> bool {
        now < self.banned_until
    }
}

/// Why no node can serve a request: how many candidates each filter removed.
///
/// Each candidate is counted once, under the first filter it fails, in the order of the
/// fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoRoute {
    /// The model the request asked for.
    pub model: Option<String>,
    /// Candidates considered (routable members, and the local node if it serves a model).
    pub known: u32,
    /// Candidates serving another model.
    pub wrong_model: u32,
    /// Candidates without tool calls.
    pub no_tools: u32,
    /// Candidates without structured output.
    pub no_structured_output: u32,
    /// Candidates whose context window is below `min_context`.
    pub small_context: u32,
    /// The context window the request needs.
    pub min_context: u32,
    /// Candidates that ask more per 1000 tokens than the request may pay.
    pub overpriced: u32,
    /// The most the request may pay per 1000 tokens.
    pub max_price: Option<Price>,
    /// Candidates the caller excluded (they already failed this request).
    pub excluded: u32,
    /// Candidates banned after failures.
    pub banned: u32,
    /// Milliseconds until the first ban ends, when some candidate is banned.
    pub first_unban_in_ms: Option<u64>,
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no node in the domain can serve this request: ")?;
        if self.known == 0 {
            return f.write_str(
                "no routable member is known (the node may still be joining its domain; check \
                 its bootstrap peers and that members run a model the domain accepts)",
            );
        }
        write!(
            f,
            "of {} candidate node{}",
            self.known,
            if self.known == 1 { "" } else { "s" }
        )?;
        let mut parts = Vec::new();
        if self.wrong_model > 0 {
            let model = self.model.as_deref().unwrap_or("");
            parts.push(format!(
                "{} serve another model than {model:?}",
                self.wrong_model
            ));
        }
        if self.no_tools > 0 {
            parts.push(format!("{} do not offer tool calls", self.no_tools));
        }
        if self.no_structured_output > 0 {
            parts.push(format!(
                "{} do not offer structured output",
                self.no_structured_output
            ));
        }
        if self.small_context > 0 {
            parts.push(format!(
                "{} have a context window below the {} tokens needed",
                self.small_context, self.min_context
            ));
        }
        if self.overpriced > 0 {
            parts.push(format!(
                "{} ask more than the {} this request may pay",
                self.overpriced,
                self.max_price.unwrap_or_default()
            ));
        }
        if self.excluded > 0 {
            parts.push(format!("{} already failed this request", self.excluded));
        }
        if self.banned > 0 {
            let when = self
                .first_unban_in_ms
                .map(|ms| format!(" (the first comes back in {} s)", ms.div_ceil(1000)))
                .unwrap_or_default();
            parts.push(format!(
                "{} are banned for a while after failures{when}",
                self.banned
            ));
        }
        write!(f, ", {}", parts.join(", "))
    }
}

impl std::error::Error for NoRoute {}

/// Why a candidate cannot take a request.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    WrongModel,
    NoTools,
    NoStructuredOutput,
    SmallContext,
    Overpriced,
    Excluded,
    /// Banned until then.
    Banned(Millis),
}

impl NoRoute {
    fn count(&mut self, refusal: Refusal, now: Millis) {
        match refusal {
            Refusal::WrongModel => self.wrong_model += 1,
            Refusal::NoTools => self.no_tools += 1,
            Refusal::NoStructuredOutput => self.no_structured_output += 1,
            Refusal::SmallContext => self.small_context += 1,
            Refusal::Overpriced => self.overpriced += 1,
            Refusal::Excluded => self.excluded += 1,
            Refusal::Banned(until) => {
                self.banned += 1;
                let left = until.since(now);
                self.first_unban_in_ms = Some(self.first_unban_in_ms.map_or(left, |l| l.min(left)));
            }
        }
    }
}

/// Pools smaller than this are scanned whole by [`Router::choose_in`] (a pass over a few
/// dozen candidates costs less than drawing).
pub const SAMPLE_MIN_POOL: usize = 32;
/// Positions [`Router::choose_in`] draws before it falls back to a pass over the pool.
pub const SAMPLE_DRAWS: usize = 24;

/// Candidates that can be drawn by position: the membership table.
pub trait CandidatePool {
    /// The number of positions (some may hold no candidate).
    fn positions(&self) -> usize;
    /// The candidate at `position`, if it holds a routable one.
    fn at(&self, position: usize) -> Option<Candidate<'_>>;
    /// Every candidate, in position order.
    fn all(&self) -> impl Iterator<Item = Candidate<'_>>;
    /// The candidate `node`, if routable.
    fn get(&self, node: &NodeId) -> Option<Candidate<'_>> {
        self.all().find(|c| c.node == *node)
    }
}

/// Chooses the node for each request; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Router {
    config: Config,
    rng: SeededRng,
    peers: HashMap<NodeId, PeerStats>,
    affinity: Affinity,
    affinity_hits: u64,
}

impl Router {
    /// A router with no statistics; `seed` drives its random choices.
    pub fn new(config: Config, seed: u64) -> Result<Self, ConfigError> {
        config.check()?;
        Ok(Self {
            config,
            rng: SeededRng::new(seed),
            peers: HashMap::new(),
            affinity: Affinity::default(),
            affinity_hits: 0,
        })
    }

    /// Chooses the node for a request with `needs` among `candidates`, never one in `exclude`
    /// or banned at `now`. Deterministic given the seed and the sequence of calls.
    pub fn choose<'a>(
        &mut self,
        now: Millis,
        needs: &Needs,
        candidates: impl IntoIterator<Item = Candidate<'a>>,
        exclude: &[NodeId],
    ) -> Result<NodeId, NoRoute> {
        let mut report = NoRoute {
            model: needs.model.clone(),
            min_context: needs.min_context,
            max_price: needs.max_price,
            ..NoRoute::default()
        };
        // Two distinct qualifying candidates drawn uniformly in one pass, without collecting
        // them (reservoir sampling, Algorithm R with a reservoir of two).
        let mut drawn: [Option<Candidate<'a>>; 2] = [None, None];
        let mut eligible: u64 = 0;
        let remembered = self.remembered(now, needs);
        let mut sticky = None;
        for candidate in candidates {
            report.known += 1;
            match self.refusal(now, needs, &candidate, exclude) {
                Some(reason) => report.count(reason, now),
                None => {
                    if remembered == Some(candidate.node) {
                        sticky = Some(candidate);
                    }
                    let slot = if eligible < 2 {
                        eligible
                    } else {
                        self.rng.below(eligible + 1)
                    };
                    if let Some(slot) = usize::try_from(slot).ok().and_then(|i| drawn.get_mut(i)) {
                        *slot = Some(candidate);
                    }
                    eligible += 1;
                }
            }
        }
        let winner = match drawn {
            [Some(a), Some(b)] => self.better_of(now, a, b),
            [Some(only), None] => only,
            _ => return Err(report),
        };
        Ok(self.settle(now, needs, winner, sticky))
    }

    /// As [`choose`](Self::choose), drawing from a `pool` that can be indexed (the membership
    /// table): the two candidates are drawn by position, a few draws per request instead of a
    /// pass over the whole table, so a request costs the same in a domain of ten thousand as
    /// in one of ten. The draw is the same as `choose`'s (two distinct qualifying candidates,
    /// uniformly at random: positions are drawn uniformly and the ones that do not qualify are
    /// drawn again); when [`SAMPLE_DRAWS`] draws do not find two (few candidates qualify, or the
    /// pool is small), it falls back to `choose`'s pass, which also explains a refusal.
    pub fn choose_in<P: CandidatePool>(
        &mut self,
        now: Millis,
        needs: &Needs,
        pool: &P,
        exclude: &[NodeId],
    ) -> Result<NodeId, NoRoute> {
        let len = pool.positions();
        if len >= SAMPLE_MIN_POOL {
            let mut first: Option<Candidate<'_>> = None;
            for _ in 0..SAMPLE_DRAWS {
                let Some(candidate) = pool.at(self.rng.index(len)) else {
                    continue;
                };
                if self.refusal(now, needs, &candidate, exclude).is_some() {
                    continue;
                }
                match first {
                    None => first = Some(candidate),
                    Some(a) if a.node == candidate.node => {}
                    Some(a) => {
                        let winner = self.better_of(now, a, candidate);
                        let sticky = self
                            .remembered(now, needs)
                            .and_then(|node| pool.get(&node))
                            .filter(|c| self.refusal(now, needs, c, exclude).is_none());
                        return Ok(self.settle(now, needs, winner, sticky));
                    }
                }
            }
        }
        self.choose(now, needs, pool.all(), exclude)
    }

    /// The better scored of two candidates; ties go either way at random, so equal nodes
    /// share the load evenly.
    fn better_of<'c>(&mut self, now: Millis, a: Candidate<'c>, b: Candidate<'c>) -> Candidate<'c> {
        let (score_a, score_b) = (self.score(now, &a), self.score(now, &b));
        let a_wins = if score_a == score_b {
            self.rng.below(2) == 0
        } else {
            score_a < score_b
        };
        if a_wins { a } else { b }
    }

    /// The node chosen for the longest remembered prefix of the request's conversation.
    fn remembered(&self, now: Millis, needs: &Needs) -> Option<NodeId> {
        if self.config.affinity_slack == 0.0 {
            return None;
        }
        self.affinity.lookup(
            now,
            self.config.affinity_ttl_ms,
            &needs.conversation.prefixes,
        )
    }

    /// The final choice between the power-of-two `winner` and the qualifying node that holds
    /// the conversation (`sticky`), remembered for the conversation's next turn.
    fn settle(
        &mut self,
        now: Millis,
        needs: &Needs,
        winner: Candidate<'_>,
        sticky: Option<Candidate<'_>>,
    ) -> NodeId {
        let chosen = match sticky {
            Some(s) if s.node == winner.node => {
                self.affinity_hits += 1;
                s.node
            }
            // Load only: the latency mean would count against the node that holds the
            // conversation the prefill time that affinity saves.
            Some(s) if self.load(&s) <= self.config.affinity_slack * self.load(&winner) => {
                self.affinity_hits += 1;
                s.node
            }
            _ => winner.node,
        };
        if let Some(key) = needs
            .conversation
            .whole
            .filter(|_| self.config.affinity_slack > 0.0)
        {
            self.affinity
                .remember(now, self.config.max_affinity, key, chosen);
        }
        chosen
    }

    /// Requests sent to the node that held their conversation, and the number of
    /// conversations remembered.
    pub fn affinity(&self) -> (u64, usize) {
        (self.affinity_hits, self.affinity.len())
    }

    /// Why `candidate` cannot take a request with `needs` now, if it cannot.
    fn refusal(
        &self,
        now: Millis,
        needs: &Needs,
        candidate: &Candidate<'_>,
        exclude: &[NodeId],
    ) -> Option<Refusal> {
        if needs
            .model
            .as_deref()
            .is_some_and(|model| model != candidate.model_name)
        {
            Some(Refusal::WrongModel)
        } else if needs.tools && !candidate.capabilities.tools {
            Some(Refusal::NoTools)
        } else if needs.structured_output && !candidate.capabilities.structured_output {
            Some(Refusal::NoStructuredOutput)
        } else if candidate.capabilities.context_length < needs.min_context {
            Some(Refusal::SmallContext)
        } else if needs
            .max_price
            .is_some_and(|max| !candidate.price.within(&max))
        {
            Some(Refusal::Overpriced)
        } else if exclude.contains(&candidate.node) {
            Some(Refusal::Excluded)
        } else {
            self.peers
                .get(&candidate.node)
                .filter(|s| s.is_banned(now))
                .map(|s| Refusal::Banned(s.banned_until))
        }
    }

    /// The score of `candidate` at `now` (lower is better); see the
    /// [module documentation](self).
    pub fn score(&self, now: Millis, candidate: &Candidate<'_>) -> f64 {
        let stats = self.peers.get(&candidate.node);
        let load = self.load(candidate);
        let measured = stats.map_or(self.config.unknown_latency_ms, |s| {
            latency_at(&self.config, s, now)
        });
        let waiting = stats
            .and_then(|s| s.waiting_since)
            .map_or(0.0, |since| now.since(since) as f64);
        load * (1.0 + measured.max(waiting) / self.config.latency_scale_ms)
    }

    /// `1 +` the requests `candidate` runs or queues: what it advertised, and what this node
    /// sent there since.
    fn load(&self, candidate: &Candidate<'_>) -> f64 {
        1.0 + f64::from(candidate.load.in_flight)
            + f64::from(candidate.load.queued)
            + f64::from(self.peers.get(&candidate.node).map_or(0, |s| s.in_flight))
    }

    /// Records what happened to a request at `now`.
    pub fn observe(&mut self, now: Millis, observation: Observation) {
        let node = match observation {
            Observation::Dispatched { node }
            | Observation::FirstToken { node, .. }
            | Observation::Succeeded { node }
            | Observation::Failed { node }
            | Observation::Released { node } => node,
        };
        let config = &self.config;
        let Some(stats) = Self::entry(&mut self.peers, config.max_tracked_peers, node) else {
            return;
        };
        // The mean a new sample moves: what is left of the old one after fading.
        let add_sample = |stats: &mut PeerStats, sample: f64| {
            let mean = stats.latency_ms.map(|_| latency_at(config, stats, now));
            stats.latency_ms =
                Some(mean.map_or(sample, |m| m + config.latency_alpha * (sample - m)));
            stats.sampled_at = now;
        };
        stats.last_used = now;
        match observation {
            Observation::Dispatched { .. } => {
                stats.in_flight = stats.in_flight.saturating_add(1);
                stats.waiting_since.get_or_insert(now);
            }
            Observation::FirstToken { latency_ms, .. } => {
                stats.waiting_since = None;
                add_sample(stats, latency_ms as f64);
            }
            Observation::Succeeded { .. } => {
                stats.in_flight = stats.in_flight.saturating_sub(1);
                if stats.in_flight == 0 {
                    stats.waiting_since = None;
                }
                stats.failures = 0;
                stats.banned_until = Millis(0);
            }
            Observation::Failed { .. } => {
                stats.in_flight = stats.in_flight.saturating_sub(1);
                add_sample(stats, config.failure_latency_ms);
                stats.failures = stats.failures.saturating_add(1);
                if stats.in_flight == 0 {
                    stats.waiting_since = None;
                }
                let doublings = stats.failures.saturating_sub(1).min(63);
                let ban = config
                    .ban_base_ms
                    .saturating_mul(1u64 << doublings)
                    .min(config.ban_max_ms);
                stats.banned_until = now.plus(ban);
            }
            Observation::Released { .. } => {
                stats.in_flight = stats.in_flight.saturating_sub(1);
                if stats.in_flight == 0 {
                    stats.waiting_since = None;
                }
            }
        }
    }

    /// Forgets `node` (it left the domain).
    pub fn forget(&mut self, node: &NodeId) {
        self.peers.remove(node);
    }

    /// What this node knows of `node`.
    pub fn stats(&self, node: &NodeId) -> Option<&PeerStats> {
        self.peers.get(node)
    }

    /// Whether `node` is banned at `now`.
    pub fn is_banned(&self, now: Millis, node: &NodeId) -> bool {
        self.peers.get(node).is_some_and(|s| s.is_banned(now))
    }

    /// The number of nodes with statistics.
    pub fn tracked(&self) -> usize {
        self.peers.len()
    }

    /// The statistics entry of `node`, made room for if the table is full: the idle, unbanned
    /// entry used least recently goes, else an idle banned one. `None` when every entry has
    /// requests in flight (the table then stays as it is).
    fn entry(
        peers: &mut HashMap<NodeId, PeerStats>,
        cap: usize,
        node: NodeId,
    ) -> Option<&mut PeerStats> {
        if !peers.contains_key(&node) && peers.len() >= cap {
            let victim = peers
                .iter()
                .filter(|(_, s)| s.in_flight == 0)
                .min_by_key(|(id, s)| (s.failures > 0, s.last_used, **id))
                .map(|(id, _)| *id)?;
            peers.remove(&victim);
        }
        Some(peers.entry(node).or_default())
    }
}

/// The mean latency of `stats` at `now`: its excess over `unknown_latency_ms` halved once per
/// `latency_half_life_ms` since the last sample.
fn latency_at(config: &Config, stats: &PeerStats, now: Millis) -> f64 {
    let unknown = config.unknown_latency_ms;
    stats.latency_ms.map_or(unknown, |mean| {
        let halvings = now.since(stats.sampled_at) as f64 / config.latency_half_life_ms as f64;
        unknown + (mean - unknown) * 0.5f64.powf(halvings)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::{Capabilities, Load};

    struct Node {
        id: NodeId,
        model: String,
        caps: Capabilities,
        load: Load,
        price: Price,
    }

    fn node(i: u8) -> Node {
        Node {
            id: NodeId([i; 20]),
            model: "m".into(),
            caps: Capabilities {
                tools: true,
                structured_output: true,
                context_length: 8192,
                max_tokens: 1024,
            },
            load: Load {
                in_flight: 0,
                queued: 0,
                tokens_per_s: 50.0,
            },
            price: Price::flat(10),
        }
    }

    fn candidates(nodes: &[Node]) -> impl Iterator<Item = Candidate<'_>> {
        nodes.iter().map(|n| Candidate {
            node: n.id,
            model_name: &n.model,
            capabilities: &n.caps,
            load: &n.load,
            price: n.price,
        })
    }

    fn router(seed: u64) -> Router {
        Router::new(Config::default(), seed).unwrap()
    }

    fn needs() -> Needs {
        Needs {
            model: Some("m".into()),
            ..Needs::default()
        }
    }

    #[test]
    fn never_picks_an_incapable_excluded_or_banned_node() {
        let mut nodes: Vec<Node> = (1..=7).map(node).collect();
        nodes[0].model = "other".into();
        nodes[1].caps.tools = false;
        nodes[2].caps.structured_output = false;
        nodes[3].caps.context_length = 1024;
        // Within the prompt price, above the completion price.
        nodes[6].price = Price {
            prompt: 10,
            completion: 11,
        };
        // nodes[4] is excluded, nodes[5] banned, nodes[6] asks too much: nobody qualifies.
        let mut r = router(1);
        let now = Millis(10_000);
        r.observe(now, Observation::Dispatched { node: nodes[5].id });
        r.observe(now, Observation::Failed { node: nodes[5].id });
        let full = Needs {
            model: Some("m".into()),
            tools: true,
            structured_output: true,
            min_context: 4096,
            max_price: Some(Price::flat(10)),
            conversation: Conversation::default(),
        };
        let err = r
            .choose(now, &full, candidates(&nodes), &[nodes[4].id])
            .unwrap_err();
        assert_eq!(
            (
                err.known,
                err.wrong_model,
                err.no_tools,
                err.no_structured_output,
                err.small_context,
                err.overpriced,
                err.excluded,
                err.banned
            ),
            (7, 1, 1, 1, 1, 1, 1, 1)
        );
        assert!(
            err.to_string()
                .contains("1 ask more than the 10 per 1000 tokens")
        );
        // A request nobody pays for may go to any price; one that may pay 11 too.
        for max_price in [None, Some(Price::flat(11))] {
            let needs = Needs {
                max_price,
                ..full.clone()
            };
            assert_eq!(
                r.choose(now, &needs, candidates(&nodes), &[nodes[4].id]),
                Ok(nodes[6].id)
            );
        }
        assert_eq!(err.first_unban_in_ms, Some(2_000));
        let message = err.to_string();
        assert!(
            message.starts_with("no node in the domain can serve this request: of 7 candidate"),
            "{message}"
        );
        for part in [
            "1 serve another model than \"m\"",
            "1 do not offer tool calls",
            "1 do not offer structured output",
            "below the 4096 tokens needed",
            "1 already failed this request",
            "comes back in 2 s",
        ] {
            assert!(message.contains(part), "{message} lacks {part}");
        }

        // Add one good node: it is always the one chosen.
        nodes.push(node(7));
        for _ in 0..1_000 {
            let chosen = r
                .choose(now, &full, candidates(&nodes), &[nodes[4].id])
                .unwrap();
            assert_eq!(chosen, nodes[6].id);
        }
        // Once the ban is over, the banned node qualifies again, but scores as slow: the
        // good node wins every draw against it, and it is chosen when it is the only one.
        let later = now.plus(2_000);
        for _ in 0..200 {
            let chosen = r
                .choose(later, &full, candidates(&nodes), &[nodes[4].id])
                .unwrap();
            assert_eq!(chosen, nodes[6].id);
        }
        let alone = r
            .choose(
                later,
                &full,
                candidates(&nodes),
                &[nodes[4].id, nodes[6].id],
            )
            .unwrap();
        assert_eq!(alone, nodes[5].id);
    }

    /// A pool over test nodes; the `None` positions stand for members that are not routable.
    struct Pool(Vec<Option<Node>>);

    impl CandidatePool for Pool {
        fn positions(&self) -> usize {
            self.0.len()
        }

        fn at(&self, position: usize) -> Option<Candidate<'_>> {
            self.0.get(position)?.as_ref().map(|n| Candidate {
                node: n.id,
                model_name: &n.model,
                capabilities: &n.caps,
                load: &n.load,
                price: n.price,
            })
        }

        fn all(&self) -> impl Iterator<Item = Candidate<'_>> {
            (0..self.0.len()).filter_map(|i| self.at(i))
        }
    }

    fn big_pool(len: u8) -> Pool {
        Pool((0..len).map(|i| (i % 5 != 0).then(|| node(i))).collect())
    }

    #[test]
    fn drawing_from_a_large_pool_spreads_load_over_every_qualifying_node_only() {
        let mut pool = big_pool(200);
        // Every seventh node serves another model; node 3 is excluded and node 4 banned.
        for slot in pool.0.iter_mut().flatten() {
            if slot.id.0[0] % 7 == 0 {
                slot.model = "other".into();
            }
        }
        let mut r = router(5);
        let t0 = Millis(1_000);
        r.observe(
            t0,
            Observation::Dispatched {
                node: NodeId([4; 20]),
            },
        );
        r.observe(
            t0,
            Observation::Failed {
                node: NodeId([4; 20]),
            },
        );
        let mut counts = std::collections::HashMap::new();
        for _ in 0..20_000 {
            let chosen = r
                .choose_in(t0, &needs(), &pool, &[NodeId([3; 20])])
                .unwrap();
            *counts.entry(chosen.0[0]).or_insert(0u32) += 1;
        }
        let qualifying: Vec<u8> = (0..200u8)
            .filter(|i| i % 5 != 0 && i % 7 != 0 && *i != 3 && *i != 4)
            .collect();
        assert_eq!(
            counts.len(),
            qualifying.len(),
            "every qualifying node gets requests"
        );
        for (node, count) in &counts {
            assert!(qualifying.contains(node), "node {node} does not qualify");
            // 20 000 draws over 135 equal nodes: about 148 each.
            assert!((80..230).contains(count), "node {node}: {count}");
        }
    }

    #[test]
    fn a_pool_with_few_qualifying_nodes_falls_back_to_a_pass_and_explains_a_refusal() {
        let mut pool = big_pool(200);
        for slot in pool.0.iter_mut().flatten() {
            if slot.id.0[0] != 77 && slot.id.0[0] != 199 {
                slot.model = "other".into();
            }
        }
        let mut r = router(9);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(r.choose_in(Millis(0), &needs(), &pool, &[]).unwrap().0[0]);
        }
        assert_eq!(seen, [77u8, 199].into_iter().collect());
        let err = r
            .choose_in(
                Millis(0),
                &needs(),
                &pool,
                &[NodeId([77; 20]), NodeId([199; 20])],
            )
            .unwrap_err();
        assert_eq!(err.known, 160);
        assert_eq!(err.excluded, 2);
        assert_eq!(err.wrong_model, 158);
    }

    #[test]
    fn an_empty_domain_says_so() {
        let mut r = router(1);
        let err = r.choose(Millis(0), &needs(), [], &[]).unwrap_err();
        assert!(
            err.to_string().contains("no routable member is known"),
            "{err}"
        );
    }

    #[test]
    fn any_model_is_accepted_without_a_model_name() {
        let mut nodes = vec![node(1)];
        nodes[0].model = "whatever".into();
        let mut r = router(1);
        let chosen = r
            .choose(Millis(0), &Needs::default(), candidates(&nodes), &[])
            .unwrap();
        assert_eq!(chosen, nodes[0].id);
        assert!(
            r.choose(Millis(0), &needs(), candidates(&nodes), &[])
                .is_err()
        );
    }

    #[test]
    fn spreads_load_evenly_over_equal_nodes() {
        let nodes: Vec<Node> = (1..=10).map(node).collect();
        let mut r = router(7);
        let mut counts: HashMap<NodeId, u32> = HashMap::new();
        let picks = 10_000;
        for _ in 0..picks {
            let chosen = r
                .choose(Millis(0), &needs(), candidates(&nodes), &[])
                .unwrap();
            *counts.entry(chosen).or_default() += 1;
        }
        assert_eq!(counts.len(), 10);
        let expected = f64::from(picks) / 10.0;
        let chi_square: f64 = counts
            .values()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        // 9 degrees of freedom: 27.9 is the 0.1% critical value.
        assert!(chi_square < 27.9, "chi-square {chi_square}: {counts:?}");
    }

    #[test]
    fn local_in_flight_counts_keep_equal_nodes_balanced() {
        // Requests that never end: power of two choices keeps the gap tiny.
        let nodes: Vec<Node> = (1..=10).map(node).collect();
        let mut r = router(3);
        for _ in 0..1_000 {
            let chosen = r
                .choose(Millis(0), &needs(), candidates(&nodes), &[])
                .unwrap();
            r.observe(Millis(0), Observation::Dispatched { node: chosen });
        }
        let loads: Vec<u32> = nodes
            .iter()
            .map(|n| r.stats(&n.id).map_or(0, |s| s.in_flight))
            .collect();
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert_eq!(loads.iter().sum::<u32>(), 1_000);
        assert!(max - min <= 4, "{loads:?}");
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let mut nodes = vec![node(1), node(2)];
        nodes[0].load.in_flight = 3;
        nodes[1].load.queued = 1;
        let mut r = router(5);
        for _ in 0..500 {
            let chosen = r
                .choose(Millis(0), &needs(), candidates(&nodes), &[])
                .unwrap();
            assert_eq!(chosen, nodes[1].id);
        }
        // Local in-flight requests count as load too.
        for _ in 0..5 {
            r.observe(Millis(0), Observation::Dispatched { node: nodes[1].id });
        }
        assert_eq!(
            r.choose(Millis(0), &needs(), candidates(&nodes), &[])
                .unwrap(),
            nodes[0].id
        );
    }

    #[test]
    fn prefers_the_faster_of_two_equally_loaded_nodes() {
        let nodes = vec![node(1), node(2)];
        let mut r = router(5);
        r.observe(
            Millis(0),
            Observation::FirstToken {
                node: nodes[0].id,
                latency_ms: 2_000,
            },
        );
        r.observe(
            Millis(0),
            Observation::FirstToken {
                node: nodes[1].id,
                latency_ms: 100,
            },
        );
        for _ in 0..100 {
            assert_eq!(
                r.choose(Millis(0), &needs(), candidates(&nodes), &[])
                    .unwrap(),
                nodes[1].id
            );
        }
        // The mean moves by alpha towards each new sample.
        r.observe(
            Millis(0),
            Observation::FirstToken {
                node: nodes[0].id,
                latency_ms: 1_000,
            },
        );
        let mean = r.stats(&nodes[0].id).unwrap().latency_ms.unwrap();
        assert!((mean - 1_800.0).abs() < 1e-9, "{mean}");
    }

    #[test]
    fn a_node_that_failed_once_is_tried_again_as_its_latency_fades() {
        let nodes = vec![node(1), node(2)];
        let mut r = router(5);
        let t0 = Millis(1_000_000);
        let fast = Observation::FirstToken {
            node: nodes[0].id,
            latency_ms: 100,
        };
        r.observe(t0, fast);
        r.observe(t0, Observation::Dispatched { node: nodes[1].id });
        r.observe(t0, Observation::Failed { node: nodes[1].id });
        let choose =
            |r: &mut Router, at: Millis| r.choose(at, &needs(), candidates(&nodes), &[]).unwrap();
        // Once its ban ends, the failed node scores as a 4 s one: the idle fast node wins.
        let half_life = Config::default().latency_half_life_ms;
        let after_ban = t0.plus(Config::default().ban_base_ms);
        assert_eq!(choose(&mut r, after_ban), nodes[0].id);
        // The fast node keeps being measured; the failed one's 4 s fade by half every half
        // life, and after six (62 ms) it is tried again.
        let mut at = after_ban;
        let mut first_retry = None;
        for _ in 0..70 {
            at = at.plus(half_life / 10);
            let chosen = choose(&mut r, at);
            if chosen == nodes[1].id {
                first_retry = Some(at.since(t0));
                break;
            }
            r.observe(at, fast);
        }
        let retry = first_retry.expect("the failed node was never tried again");
        assert!(
            retry > 5 * half_life && retry <= 6 * half_life + half_life / 10,
            "tried again after {retry} ms"
        );
        // A new sample starts from what is left of the old mean.
        r.observe(at, Observation::Dispatched { node: nodes[1].id });
        r.observe(
            at,
            Observation::FirstToken {
                node: nodes[1].id,
                latency_ms: 1_000,
            },
        );
        let mean = r.stats(&nodes[1].id).unwrap().latency_ms.unwrap();
        let faded = 4_000.0 * 0.5f64.powf(retry as f64 / half_life as f64);
        assert!(
            (mean - (faded + 0.2 * (1_000.0 - faded))).abs() < 1e-6,
            "{mean} from {faded}"
        );
        assert_eq!(choose(&mut r, at), nodes[0].id);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_on_success() {
        let config = Config {
            ban_base_ms: 1_000,
            ban_max_ms: 5_000,
            ..Config::default()
        };
        let mut r = Router::new(config, 1).unwrap();
        let peer = NodeId([9; 20]);
        let now = Millis(100_000);
        let mut bans = Vec::new();
        for _ in 0..5 {
            r.observe(now, Observation::Dispatched { node: peer });
            r.observe(now, Observation::Failed { node: peer });
            bans.push(r.stats(&peer).unwrap().banned_until.since(now));
        }
        assert_eq!(bans, vec![1_000, 2_000, 4_000, 5_000, 5_000]);
        assert!(r.is_banned(now.plus(4_999), &peer));
        assert!(!r.is_banned(now.plus(5_000), &peer));
        assert_eq!(r.stats(&peer).unwrap().in_flight, 0);

        r.observe(now, Observation::Dispatched { node: peer });
        r.observe(now, Observation::Succeeded { node: peer });
        assert!(!r.is_banned(now, &peer));
        assert_eq!(r.stats(&peer).unwrap().failures, 0);
        r.observe(now, Observation::Failed { node: peer });
        assert_eq!(r.stats(&peer).unwrap().banned_until, now.plus(1_000));

        // Many failures never overflow.
        for _ in 0..200 {
            r.observe(now, Observation::Failed { node: peer });
        }
        assert_eq!(r.stats(&peer).unwrap().banned_until, now.plus(5_000));
    }

    #[test]
    fn released_requests_leave_bans_alone() {
        let mut r = router(1);
        let peer = NodeId([9; 20]);
        r.observe(Millis(0), Observation::Dispatched { node: peer });
        r.observe(Millis(0), Observation::Released { node: peer });
        let stats = r.stats(&peer).unwrap();
        assert_eq!((stats.in_flight, stats.failures), (0, 0));
        assert!(!r.is_banned(Millis(0), &peer));
        // An unmatched end never underflows.
        r.observe(Millis(0), Observation::Released { node: peer });
        assert_eq!(r.stats(&peer).unwrap().in_flight, 0);
        r.forget(&peer);
        assert!(r.stats(&peer).is_none());
    }

    #[test]
    fn choices_are_reproducible_from_the_seed() {
        let nodes: Vec<Node> = (1..=20).map(node).collect();
        let run = |seed| {
            let mut r = router(seed);
            (0..100)
                .map(|_| {
                    r.choose(Millis(0), &needs(), candidates(&nodes), &[])
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn the_statistics_table_is_bounded() {
        let config = Config {
            max_tracked_peers: 3,
            ..Config::default()
        };
        let mut r = Router::new(config, 1).unwrap();
        let busy = NodeId([1; 20]);
        r.observe(Millis(0), Observation::Dispatched { node: busy });
        for i in 2..=10u8 {
            r.observe(
                Millis(u64::from(i)),
                Observation::Succeeded {
                    node: NodeId([i; 20]),
                },
            );
        }
        assert_eq!(r.tracked(), 3);
        // The entry with a request in flight is never dropped.
        assert_eq!(r.stats(&busy).unwrap().in_flight, 1);
        assert!(r.stats(&NodeId([10; 20])).is_some());
    }

    #[test]
    fn bad_configs_are_refused() {
        for config in [
            Config {
                ban_base_ms: 0,
                ..Config::default()
            },
            Config {
                ban_max_ms: 1,
                ..Config::default()
            },
            Config {
                latency_alpha: 0.0,
                ..Config::default()
            },
            Config {
                latency_scale_ms: f64::NAN,
                ..Config::default()
            },
            Config {
                max_tracked_peers: 0,
                ..Config::default()
            },
            Config {
                latency_half_life_ms: 0,
                ..Config::default()
            },
        ] {
            let err = Router::new(config, 1).unwrap_err();
            assert!(err.to_string().starts_with("invalid router configuration"));
        }
    }

    fn chat(turns: &[&str]) -> Needs {
        let messages: Vec<&[u8]> = turns.iter().map(|t| t.as_bytes()).collect();
        Needs {
            conversation: Conversation::of(messages),
            ..Needs::default()
        }
    }

    #[test]
    fn conversation_keys_are_the_prefixes_longest_first() {
        let one = Conversation::of([b"sys".as_slice(), b"hi"]);
        let three = Conversation::of([b"sys".as_slice(), b"hi", b"hello", b"more"]);
        assert_eq!(three.prefixes.len(), 3);
        assert_eq!(three.prefixes[2], one.prefixes[0]);
        assert_eq!(three.prefixes[1], one.whole.unwrap());
        // Message boundaries count: "ab" + "c" is not "a" + "bc".
        let ab = Conversation::of([b"ab".as_slice(), b"c"]);
        let bc = Conversation::of([b"a".as_slice(), b"bc"]);
        assert_ne!(ab.whole, bc.whole);
        assert_eq!(
            Conversation::of(std::iter::empty()),
            Conversation::default()
        );
        let long: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let long = Conversation::of(long.iter().map(Vec::as_slice));
        assert_eq!(long.prefixes.len(), MAX_PREFIXES);
    }

    /// Turn `turn` (from 1) of chat `c`: a system message, then a question and answer per turn.
    fn turn_of(c: usize, turn: usize) -> Needs {
        let mut messages = vec!["sys".to_string()];
        for t in 1..turn {
            messages.push(format!("chat {c} question {t}"));
            messages.push(format!("chat {c} answer {t}"));
        }
        messages.push(format!("chat {c} question {turn}"));
        let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
        chat(&refs)
    }

    #[test]
    fn a_conversation_sticks_to_its_node_unless_that_node_is_much_busier() {
        let mut nodes: Vec<Node> = (0..8).map(node).collect();
        let mut r = router(7);
        let now = Millis(1_000);
        let pick = |r: &mut Router, nodes: &[Node], needs: &Needs, exclude: &[NodeId]| {
            r.choose(now, needs, candidates(nodes), exclude).unwrap()
        };
        // Turn one of many conversations: spread by the power of two choices.
        let first: Vec<NodeId> = (0..64)
            .map(|c| pick(&mut r, &nodes, &turn_of(c, 1), &[]))
            .collect();
        let spread: std::collections::HashSet<_> = first.iter().collect();
        assert!(spread.len() >= 6, "turn one went to {} nodes", spread.len());
        // Turns two and three go where turn one went.
        for (c, &served) in first.iter().enumerate() {
            assert_eq!(pick(&mut r, &nodes, &turn_of(c, 2), &[]), served);
            assert_eq!(pick(&mut r, &nodes, &turn_of(c, 3), &[]), served);
        }
        assert_eq!(r.affinity(), (128, 192));
        // A node busier than twice the best other choice loses its conversations...
        let busy = nodes.iter().position(|n| n.id == first[0]).unwrap();
        nodes[busy].load.in_flight = 4;
        let moved = pick(&mut r, &nodes, &turn_of(0, 4), &[]);
        assert_ne!(moved, first[0]);
        // ... and the conversation then follows its new node.
        nodes[busy].load.in_flight = 0;
        assert_eq!(pick(&mut r, &nodes, &turn_of(0, 5), &[]), moved);
        // One in flight is within the slack: the conversation stays.
        let at = nodes.iter().position(|n| n.id == moved).unwrap();
        nodes[at].load.in_flight = 1;
        assert_eq!(pick(&mut r, &nodes, &turn_of(0, 6), &[]), moved);
        // An excluded node (it failed this request) is not chosen for affinity.
        assert_ne!(pick(&mut r, &nodes, &turn_of(1, 4), &[first[1]]), first[1]);
        // Entries expire.
        let later = now.plus(Config::default().affinity_ttl_ms + 1);
        let kept = (2..64)
            .filter(|&c| {
                r.choose(later, &turn_of(c, 4), candidates(&nodes), &[])
                    .unwrap()
                    == first[c]
            })
            .count();
        assert!(kept < 30, "{kept} of 62 stayed after expiry");
    }

    #[test]
    fn affinity_works_when_drawing_from_a_large_pool_and_can_be_turned_off() {
        let pool = big_pool(200);
        let mut r = router(3);
        let now = Millis(0);
        for c in 0..50 {
            let q = format!("q{c}");
            let one = r.choose_in(now, &chat(&[&q]), &pool, &[]).unwrap();
            let two = r
                .choose_in(now, &chat(&[&q, "a", "f"]), &pool, &[])
                .unwrap();
            assert_eq!(one, two);
        }
        let mut off = Router::new(
            Config {
                affinity_slack: 0.0,
                ..Config::default()
            },
            3,
        )
        .unwrap();
        let mut same = 0;
        for c in 0..50 {
            let q = format!("q{c}");
            let one = off.choose_in(now, &chat(&[&q]), &pool, &[]).unwrap();
            let two = off
                .choose_in(now, &chat(&[&q, "a", "f"]), &pool, &[])
                .unwrap();
            same += usize::from(one == two);
        }
        assert!(
            same < 10,
            "{same} of 50 conversations stayed together without affinity"
        );
        assert_eq!(off.affinity(), (0, 0));
    }

    #[test]
    fn the_affinity_table_is_bounded() {
        let nodes: Vec<Node> = (0..4).map(node).collect();
        let mut r = Router::new(
            Config {
                max_affinity: 100,
                ..Config::default()
            },
            1,
        )
        .unwrap();
        for c in 0..1_000 {
            r.choose(
                Millis(0),
                &chat(&[&format!("{c}")]),
                candidates(&nodes),
                &[],
            )
            .unwrap();
            assert!(r.affinity().1 <= 100);
        }
    }
}
