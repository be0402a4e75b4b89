//! Membership: one domain as this node sees it.
//!
//! [`Membership`] is a sans-IO state machine. The caller feeds it [`Event`]s with the current
//! time through [`Membership::handle`]; it answers with a [`Verdict`] on the message the event
//! carried (for the gossip layer: forward it, drop it quietly, or drop it and penalise the
//! sender) and appends [`Action`]s for the caller to carry out.
//!
//! # State
//!
//! - The domain's verified [`DomainManifest`] (the highest version seen, signed by the operator
//!   named at construction).
//! - The **member table**: for each member, its latest verified [`Signed<Advert>`], its
//!   certificate, when it was last heard of, and whether it is routable. Ordered by address, at
//!   most [`Config::max_members`] entries. A newcomer finding the table full gets in only if it
//!   is routable, at the cost of a member that is not, else of the highest-ranked member that
//!   never served this node ([`Event::Served`]) if the newcomer ranks below it; members that
//!   served are never evicted for it. Ranks are a keyed hash of the address under a key only
//!   this node knows ([`Membership::rank`]): in a domain larger than the table, the table is a
//!   stable, uniform sample of it that nobody can steer, each node holding a different one.
//! - Revocations seen (at most [`Config::max_revocations`], the oldest forgotten first);
//!   certificates received for nodes not yet in the table (at most
//!   [`Config::max_pending_certificates`]); tombstones of members that left (so a late, older
//!   advert does not bring them back), each bounded.
//! - This node's own part: the service it offers ([`LocalService`]), its certificate, the
//!   advert it last published, and when the next heartbeat is due.
//!
//! # Checks at the boundary
//!
//! An advert is accepted only if, in this order (cheap checks before the signature): it passes
//! the protocol's static checks; it is for this domain; its signer is the node it describes;
//! it was sent no later than
//! [`Config::max_clock_skew_secs`] ahead of this node's clock; it is newer than what the table
//! holds; the manifest's admission policy admits the node; its signature verifies; it does not
//! reuse the member's last sequence number for other content; and, unless admission is
//! [`Admission::Open`], it comes with (or this node holds) a certificate of the operator for
//! that node that is valid now and not revoked. A failure is a [`Verdict::Reject`] and an
//! [`Action::Penalise`] of the sender, except for the drops below.
//!
//! # Who is blamed
//!
//! The advert's own signature is what makes it authentic, so any peer may relay it: gossip
//! messages carry no libp2p signature (one verification per copy received cost more CPU than
//! everything else a node does with an advert), and `from` is the peer that *delivered* the
//! message, authenticated by its connection. A relay validates before it forwards, so a
//! forgery ([`Rejection`]s that need no state to detect: malformed, wrong domain, bad signature)
//! is the deliverer's fault. A rejection that depends on this node's view (clock, table,
//! certificates, revocations: an equivocation, a skewed clock, a missing certificate) blames the
//! deliverer only when it is the advert's own node; relayed by another peer, it is only an
//! [`Verdict::Ignore`] (not forwarded, nobody penalised), so a node cannot get honest relays
//! banned by equivocating through them.
//!
//! Some drops are not the sender's fault and are only a [`Verdict::Ignore`]: an advert sent
//! longer ago than [`Config::max_advert_age_ms`] (a replay or a very late relay; the limit
//! includes the clock skew, so a member whose clock is behind stays welcome), a sequence number
//! below the last one or the very advert already held (gossip can reorder and duplicate; an
//! equal number with *different* content is an equivocation and is rejected), this node's own
//! advert, a full table.
//!
//! The silence timeout runs on this node's clock, from when an advert *arrived*, not from its
//! `sent_at`; only adverts learnt from a snapshot are dated by their `sent_at`, and then given
//! at least one heartbeat interval before they count as silent.
//!
//! A member that passes these checks but does not meet the manifest's
//! [`Requirements`](crate::domain::Requirements) (accepted model hashes, knowledge base,
//! prompt) stays in the table, visible, but is not routable ([`Member::unroutable`]).
//!
//! # Leaving
//!
//! A member leaves the table when its advert says `leaving: true` (at once), when it has not
//! been heard of for [`Config::silent_heartbeats`] heartbeat intervals, when its certificate
//! expires or is revoked, or when a new manifest no longer admits it.
//!
//! # Heartbeats
//!
//! While this node offers a service ([`Event::LocalAdvertChanged`] with `Some`), it publishes a
//! signed advert ([`Action::Publish`]): at once when what it offers changes (not more often than
//! [`Config::min_publish_interval_ms`]; a change of load alone waits for the next heartbeat),
//! and every heartbeat interval minus a random jitter drawn from the seeded generator, so
//! members do not publish in lockstep and a member is always heard of within one interval.
//! Sequence numbers are the publication time in milliseconds (or the last number plus one), so
//! they keep increasing across restarts. `LocalAdvertChanged(None)` publishes a last advert
//! with `leaving: true`.
//!
//! # Time
//!
//! The caller calls [`Membership::handle`] with [`Event::Tick`] at least at
//! [`Membership::next_wakeup`]; silence, certificate expiry and heartbeats are only acted on
//! at ticks.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;

use foldhash::quality::FixedState;
use hashbrown::HashTable;
use std::fmt;

use crate::advert::{Advert, Capabilities, Load};
use crate::codec::EncodeError;
use crate::control::{
    ControlResponse, MAX_MEMBERS_PER_PAGE, MemberEntry, SharedAdvert, SharedCertificate,
};
use crate::domain::{
    Admission, DomainId, DomainManifest, MAX_CLOCK_SKEW_SECS, MembershipCertificate,
    MembershipError, Revocation,
};
use crate::payment::Price;
use crate::validate::{Validate, ValidationError};
use crate::{ContentHash, NodeId, SecretKey, Signed};

use super::router::{Candidate, CandidatePool};
use super::{Millis, SeededRng};

/// Tuning of a [`Membership`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How often this node publishes its advert, in milliseconds. Default 10 000.
    pub heartbeat_ms: u64,
    /// The most a heartbeat comes early, in milliseconds (below `heartbeat_ms`). Default 1 000.
    pub jitter_ms: u64,
    /// A member not heard of for this many heartbeat intervals leaves the table. Default 3.
    pub silent_heartbeats: u32,
    /// The shortest time between two adverts of this node, in milliseconds. Default 1 000.
    pub min_publish_interval_ms: u64,
    /// The most members in the table. Default 10 000.
    pub max_members: usize,
    /// The domain's advert budget: in a domain of more than `heartbeat_ms` x this x 3/4 000
    /// members, each member publishes less often, on average every `members x 1 000 / this`
    /// milliseconds (after a uniform 1/2 to 1 of 4/3 of that), so the domain as a whole
    /// publishes this many adverts per second and the gossip each node carries stops growing
    /// with the domain. The silence timeout and the acceptance window stretch with the longest
    /// interval. Default 20 (domains of up to 150 members keep the plain heartbeat).
    pub max_adverts_per_s: u32,
    /// How far ahead of this node's clock an advert's `sent_at` may be, in seconds. Default
    /// [`MAX_CLOCK_SKEW_SECS`].
    pub max_clock_skew_secs: u64,
    /// The most revocations remembered. Default 100 000.
    pub max_revocations: usize,
    /// The most certificates kept for nodes not (yet) in the table. Default 1 024.
    pub max_pending_certificates: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat_ms: 10_000,
            jitter_ms: 1_000,
            silent_heartbeats: 3,
            min_publish_interval_ms: 1_000,
            max_members: 10_000,
            max_adverts_per_s: 20,
            max_clock_skew_secs: MAX_CLOCK_SKEW_SECS,
            max_revocations: 100_000,
            max_pending_certificates: 1_024,
        }
    }
}

impl Config {
    /// How long a member may stay silent, in milliseconds.
    pub fn silence_ms(&self) -> u64 {
        self.heartbeat_ms
            .saturating_mul(u64::from(self.silent_heartbeats))
    }

    /// The oldest advert accepted, in milliseconds between its `sent_at` and now: the silence
    /// window plus the tolerated clock skew.
    pub fn max_advert_age_ms(&self) -> u64 {
        self.silence_ms()
            .saturating_add(self.max_clock_skew_secs.saturating_mul(1000))
    }

    fn check(&self) -> Result<(), NewError> {
        let fail = |reason| Err(NewError::Config(reason));
        if self.heartbeat_ms == 0 {
            return fail("heartbeat_ms must be at least 1");
        }
        if self.max_adverts_per_s == 0 {
            return fail("max_adverts_per_s must be at least 1");
        }
        if self.jitter_ms >= self.heartbeat_ms {
            return fail("jitter_ms must be below heartbeat_ms");
        }
        if self.silent_heartbeats == 0 {
            return fail("silent_heartbeats must be at least 1");
        }
        if self.max_members == 0 || self.max_revocations == 0 || self.max_pending_certificates == 0
        {
            return fail(
                "max_members, max_revocations and max_pending_certificates must be at least 1",
            );
        }
        Ok(())
    }
}

/// A [`Membership`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    /// The manifest's signature does not verify.
    #[error("the domain manifest is not validly signed by its operator: {0}")]
    ManifestSignature(#[from] crate::signed::SignedError),
    /// The manifest breaks a protocol rule.
    #[error("the domain manifest is invalid: {0}")]
    ManifestInvalid(#[from] ValidationError),
    /// The configuration is unusable.
    #[error("invalid membership configuration: {0}")]
    Config(&'static str),
}

/// What this node offers in the domain: its advert without the fields the machine fills in
/// (node, domain, sequence number, time, leaving).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalService {
    /// The model name clients use.
    pub model_name: String,
    /// The model file it runs (sha256).
    pub model_hash: ContentHash,
    /// The knowledge-base snapshot it serves, if any.
    pub kb_hash: Option<ContentHash>,
    /// The system prompt it uses, if any.
    pub prompt_hash: Option<ContentHash>,
    /// What its model can do.
    pub capabilities: Capabilities,
    /// How busy it is now.
    pub load: Load,
    /// What it asks.
    pub price: Price,
    /// Multiaddrs where it can be reached.
    pub addrs: Vec<String>,
}

impl LocalService {
    /// Whether `other` offers the same service, whatever the load.
    fn same_offer(&self, other: &LocalService) -> bool {
        self.model_name == other.model_name
            && self.model_hash == other.model_hash
            && self.kb_hash == other.kb_hash
            && self.prompt_hash == other.prompt_hash
            && self.capabilities == other.capabilities
            && self.price == other.price
            && self.addrs == other.addrs
    }

    fn to_advert(&self, node: NodeId, domain: DomainId, seq: u64, sent_at: u64) -> Advert {
        Advert {
            node,
            domain,
            seq,
            model_name: self.model_name.clone(),
            model_hash: self.model_hash,
            kb_hash: self.kb_hash,
            prompt_hash: self.prompt_hash,
            capabilities: self.capabilities.clone(),
            load: self.load.clone(),
            prompt_price: self.price.prompt,
            addrs: self.addrs.clone(),
            sent_at,
            leaving: false,
            completion_price: self.price.completion,
        }
    }
}

/// Something that happened, for the machine to act on.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "events are handled as soon as they are made, never stored in bulk"
)]
pub enum Event {
    /// An advert arrived on the domain's gossip topic.
    AdvertReceived {
        /// The peer that delivered the gossip message (its propagation source, authenticated by
        /// the connection): the advert's node or a relay.
        from: NodeId,
        /// The advert.
        advert: SharedAdvert,
        /// The publisher's certificate, if the message carried one.
        certificate: Option<SharedCertificate>,
    },
    /// A membership certificate arrived (from a peer, or this node's own from its
    /// configuration, with `from: None`).
    CertificateReceived {
        /// The peer that sent it, if any.
        from: Option<NodeId>,
        /// The certificate.
        certificate: Signed<MembershipCertificate>,
    },
    /// A revocation arrived.
    RevocationReceived {
        /// The peer that sent it, if any.
        from: Option<NodeId>,
        /// The revocation.
        revocation: Signed<Revocation>,
    },
    /// A manifest arrived, possibly a newer version of the domain's.
    ManifestReceived {
        /// The peer that sent it, if any.
        from: Option<NodeId>,
        /// The manifest.
        manifest: Signed<DomainManifest>,
    },
    /// A page of a member snapshot arrived (the answer to
    /// [`ControlRequest::MemberSnapshot`](crate::control::ControlRequest)).
    SnapshotReceived {
        /// The peer that answered.
        from: NodeId,
        /// The domain the page is for.
        domain: DomainId,
        /// The members, each to be verified like a gossiped advert.
        members: Vec<MemberEntry>,
        /// Where the next page starts, if there is one.
        next: Option<NodeId>,
    },
    /// What this node offers changed; `None` when it stops serving (or never serves: a
    /// model-less node).
    LocalAdvertChanged(Option<LocalService>),
    /// Time passed: expire silent members and publish the heartbeat when due.
    Tick,
    /// A member completed a request this node sent it (it really serves).
    Served(NodeId),
}

/// What the caller should tell the gossip layer about the message an event carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and useful: forward it.
    Accept,
    /// Do not forward it, but the sender did nothing wrong (for events that carry no message,
    /// such as [`Event::Tick`], the verdict is `Accept`).
    Ignore(Ignored),
    /// Invalid: do not forward it; the sender is penalised ([`Action::Penalise`]).
    Reject(Rejection),
}

/// Why a message was dropped without blame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// It is this node's own advert.
    #[error("the advert is this node's own")]
    Own,
    /// Its sequence number is below the member's last one.
    #[error("advert sequence number {seq} is below the latest one seen, {latest}")]
    Stale {
        /// Its sequence number.
        seq: u64,
        /// The member's last one.
        latest: u64,
    },
    /// It is the very message already held.
    #[error("the message was already received")]
    Duplicate,
    /// The node left the domain with a later advert.
    #[error("the node has left the domain")]
    Departed,
    /// It was sent too long ago to say anything about the present.
    #[error("the advert was sent at {sent_at}, too long before now ({now})")]
    TooOld {
        /// Its `sent_at`.
        sent_at: u64,
        /// This node's time, in unix seconds.
        now: u64,
    },
    /// The member table is full.
    #[error("the member table is full ({limit} members)")]
    TableFull {
        /// The table's capacity.
        limit: usize,
    },
    /// A certificate or advert correctly signed by the operator but not usable now (expired,
    /// not yet valid, revoked, not admitted).
    #[error("{0}")]
    NotUsable(String),
    /// The peer that delivered it is over its gossip budget
    /// ([`Guard`](super::guard::Guard)).
    #[error("the delivering peer is over its gossip budget")]
    OverBudget,
    /// A manifest version not above the one held.
    #[error("manifest version {version} is not newer than version {current}")]
    OldManifest {
        /// Its version.
        version: u64,
        /// The version held.
        current: u64,
    },
}

/// Why a message was rejected; the sender is penalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// It breaks a protocol rule.
    #[error("invalid {what}: {error}")]
    Invalid {
        /// The message type.
        what: &'static str,
        /// The rule it breaks.
        error: ValidationError,
    },
    /// It is for another domain.
    #[error("{what} is for domain {got}, not {expected}")]
    WrongDomain {
        /// The message type.
        what: &'static str,
        /// This domain.
        expected: DomainId,
        /// The domain it names.
        got: DomainId,
    },
    /// The advert names another node than its signer.
    #[error("advert describes {node} but is signed by {signer}")]
    NotAuthor {
        /// The node it describes.
        node: NodeId,
        /// Its signer.
        signer: NodeId,
    },
    /// The signature does not verify.
    #[error("bad signature on {what}: {reason}")]
    BadSignature {
        /// The message type.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The advert was sent too far in this node's future.
    #[error(
        "advert of {node} was sent at {sent_at}, more than {limit} s ahead of this node's clock \
         ({now}); one of the two clocks is wrong"
    )]
    ClockSkew {
        /// The node.
        node: NodeId,
        /// Its `sent_at`.
        sent_at: u64,
        /// This node's time, in unix seconds.
        now: u64,
        /// The tolerated skew, in seconds.
        limit: u64,
    },
    /// The admission policy does not admit the node.
    #[error("{node} is not admitted by the domain's admission policy")]
    NotAdmitted {
        /// The node.
        node: NodeId,
    },
    /// The domain requires a certificate and none came with the advert or was known.
    #[error("advert of {node} has no membership certificate, which this domain requires")]
    MissingCertificate {
        /// The node.
        node: NodeId,
    },
    /// The certificate is not valid for the node now.
    #[error("membership certificate of {node} is not valid: {reason}")]
    BadCertificate {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The node signed two different adverts with the same sequence number.
    #[error("{node} signed two different adverts with sequence number {seq}")]
    Equivocation {
        /// The node.
        node: NodeId,
        /// The sequence number.
        seq: u64,
    },
    /// An advert delivered over gossip long after any honest relay would still forward it:
    /// older than the acceptance window plus the tolerated clock skew. Gossip's duplicate
    /// filter forgets a message after two minutes; whoever sends it again after that replays
    /// it.
    #[error(
        "advert of {node} sent at {sent_at} delivered at {now}: a replay (older than the \
         acceptance window of {window_secs} s plus the clock skew)"
    )]
    Replayed {
        /// The node.
        node: NodeId,
        /// Its `sent_at`.
        sent_at: u64,
        /// This node's time, in unix seconds.
        now: u64,
        /// The acceptance window, in seconds.
        window_secs: u64,
    },
}

impl Rejection {
    /// Whether a peer relaying the message (in a snapshot) must have forged or corrupted it,
    /// rather than holding a view that differs from ours (another clock, a newer revocation).
    fn is_forgery(&self) -> bool {
        matches!(
            self,
            Rejection::Invalid { .. }
                | Rejection::WrongDomain { .. }
                | Rejection::NotAuthor { .. }
                | Rejection::BadSignature { .. }
                | Rejection::Replayed { .. }
        )
    }
}

/// Why a member is visible but not routable: it does not meet the manifest's requirements.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// It runs a model the domain does not accept.
    #[error("it runs model {model}, which the domain does not accept")]
    ModelNotAccepted {
        /// Its model hash.
        model: ContentHash,
    },
    /// It serves another knowledge base.
    #[error("the domain requires knowledge base {required}, it serves {got:?}")]
    WrongKnowledgeBase {
        /// The required snapshot.
        required: ContentHash,
        /// Its snapshot.
        got: Option<ContentHash>,
    },
    /// It uses another prompt.
    #[error("the domain requires prompt {required}, it uses {got:?}")]
    WrongPrompt {
        /// The required prompt.
        required: ContentHash,
        /// Its prompt.
        got: Option<ContentHash>,
    },
    /// Another requirement the protocol checks.
    #[error("{0}")]
    Other(String),
}

impl Unroutable {
    /// `None` when `advert` meets `manifest`'s requirements.
    fn check(manifest: &DomainManifest, advert: &Advert) -> Option<Self> {
        let requirements = &manifest.requirements;
        let result = requirements.check(
            &advert.model_hash,
            advert.kb_hash.as_ref(),
            advert.prompt_hash.as_ref(),
        );
        match result {
            Ok(()) => None,
            Err(MembershipError::ModelNotAccepted { model }) => {
                Some(Unroutable::ModelNotAccepted { model })
            }
            Err(MembershipError::WrongKnowledgeBase { required, got }) => {
                Some(Unroutable::WrongKnowledgeBase { required, got })
            }
            Err(MembershipError::WrongPrompt { required, got }) => {
                Some(Unroutable::WrongPrompt { required, got })
            }
            Err(other) => Some(Unroutable::Other(other.to_string())),
        }
    }
}

/// Why a member left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// Its advert said it was leaving.
    Left,
    /// It was not heard of for too long.
    Silent,
    /// Its certificate expired.
    CertificateExpired,
    /// Its certificate was revoked.
    Revoked,
    /// A new manifest no longer admits it.
    NotAdmitted,
    /// It was dropped to make room for a routable member in a full table.
    Evicted,
}

impl fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaveReason::Left => "left",
            LeaveReason::Silent => "silent",
            LeaveReason::CertificateExpired => "certificate expired",
            LeaveReason::Revoked => "certificate revoked",
            LeaveReason::NotAdmitted => "not admitted",
            LeaveReason::Evicted => "evicted",
        })
    }
}

/// Why this node cannot publish its advert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalIssue {
    /// The domain requires a certificate and this node has none.
    #[error(
        "this domain admits members by certificate and this node has none: ask the domain's \
         operator for a membership certificate"
    )]
    NoCertificate,
    /// This node's certificate is not valid now.
    #[error("this node's membership certificate is not valid: {0}")]
    BadCertificate(String),
    /// The admission policy does not admit this node.
    #[error("the domain's admission policy does not admit this node")]
    NotAdmitted,
    /// The advert could not be signed (its content breaks a protocol rule).
    #[error("this node's advert cannot be signed: {0}")]
    InvalidAdvert(String),
}

/// This node's standing in the domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalStatus {
    /// It offers no service (no model, or it stopped); it can still route requests.
    #[default]
    Idle,
    /// It publishes adverts and meets the requirements: members route to it.
    Serving,
    /// It publishes adverts but does not meet the requirements: members will not route to it.
    NotRoutable(Unroutable),
    /// It cannot publish.
    Blocked(LocalIssue),
}

/// What the caller should do.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "actions are carried out as soon as they are made, never stored in bulk"
)]
pub enum Action {
    /// Publish this advert (with this node's certificate, if the domain requires one) on the
    /// domain's gossip topic.
    Publish(MemberEntry),
    /// Ask `peer` for the next page of its member snapshot.
    RequestSnapshot {
        /// The peer.
        peer: NodeId,
        /// Start after this address.
        after: Option<NodeId>,
    },
    /// A node joined the table.
    MemberJoined {
        /// The node.
        node: NodeId,
        /// Whether it is routable.
        routable: bool,
    },
    /// A member's offer (model, capabilities, price, addresses) or routability changed; load
    /// changes alone are not reported.
    MemberUpdated {
        /// The node.
        node: NodeId,
        /// Whether it is routable now.
        routable: bool,
    },
    /// A member left the table.
    MemberLeft {
        /// The node.
        node: NodeId,
        /// Why.
        reason: LeaveReason,
    },
    /// `peer` sent an invalid message: lower its gossip score.
    Penalise {
        /// The peer.
        peer: NodeId,
        /// What it sent.
        reason: Rejection,
    },
    /// This node's standing changed (for logs, metrics and the UI).
    LocalStatusChanged(LocalStatus),
    /// A newer manifest version was accepted.
    ManifestUpdated {
        /// Its version.
        version: u64,
    },
}

/// A node in the member table.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    advert: SharedAdvert,
    certificate: Option<SharedCertificate>,
    last_heard: Millis,
    /// Its time in [`Membership::by_heard`]: at most `last_heard` (an advert does not move it).
    filed: Millis,
    joined_at: Millis,
    /// Why it is not routable (boxed: almost every member is routable, and a large
    /// simulation holds ten million entries).
    unroutable: Option<Box<Unroutable>>,
    /// Requests it completed for this node (a member that served is not evicted to make room).
    served: u32,
}

impl Member {
    /// Its address.
    pub fn node(&self) -> NodeId {
        self.advert.payload.node
    }

    /// Its latest advert (verified).
    pub fn advert(&self) -> &Advert {
        &self.advert.payload
    }

    /// Its latest advert with the signature.
    pub fn signed_advert(&self) -> &Signed<Advert> {
        &self.advert
    }

    /// Its certificate (`None` in open domains).
    pub fn certificate(&self) -> Option<&Signed<MembershipCertificate>> {
        self.certificate.as_deref()
    }

    /// When it was last heard of.
    pub fn last_heard(&self) -> Millis {
        self.last_heard
    }

    /// When it joined the table.
    pub fn joined_at(&self) -> Millis {
        self.joined_at
    }

    /// Whether requests may be routed to it.
    pub fn is_routable(&self) -> bool {
        self.unroutable.is_none()
    }

    /// Why it is not routable, if it is not.
    pub fn unroutable(&self) -> Option<&Unroutable> {
        self.unroutable.as_deref()
    }

    /// Its snapshot entry (advert and certificate).
    pub fn entry(&self) -> MemberEntry {
        MemberEntry {
            advert: SharedAdvert::clone(&self.advert),
            certificate: self.certificate.clone(),
        }
    }
}

/// The members of a table: in a dense vector, found by a hash of their address under a key
/// of this node's (no peer can choose addresses that collide). One lookup per advert is two
/// or three cache misses, where an ordered map of a thousand members took a dozen (simulated
/// with 10 000 nodes, those lookups were the largest cost of a cold start). The index holds
/// slot numbers only (5 bytes a bucket, where a map from address to slot took 25): a
/// simulation of 10 000 nodes holds ten million entries.
#[derive(Debug, Clone)]
struct Table {
    slots: Vec<Member>,
    index: HashTable<u32>,
    hasher: FixedState,
}

/// Where [`Table::remove`] took a member from.
struct Removed {
    member: Member,
    /// Its slot.
    slot: u32,
    /// The slot of the member that moved into it (the last one), if another did.
    moved_from: Option<u32>,
}

impl Table {
    fn new(seed: u64) -> Self {
        Self {
            slots: Vec::new(),
            index: HashTable::new(),
            hasher: FixedState::with_seed(seed),
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn hash(&self, node: &NodeId) -> u64 {
        self.hasher.hash_one(node)
    }

    /// The slot of `node`.
    fn slot(&self, node: &NodeId) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(self.hash(node), |&i| slots[i as usize].node() == *node)
            .copied()
    }

    fn contains_key(&self, node: &NodeId) -> bool {
        self.slot(node).is_some()
    }

    fn get(&self, node: &NodeId) -> Option<&Member> {
        self.slot(node).map(|i| &self.slots[i as usize])
    }

    fn get_mut(&mut self, node: &NodeId) -> Option<&mut Member> {
        self.slot(node).map(|i| &mut self.slots[i as usize])
    }

    /// The member in `slot`.
    fn at(&self, slot: u32) -> &Member {
        &self.slots[slot as usize]
    }

    /// Adds `member`, which must not be in the table, and returns its slot.
    fn push(&mut self, member: Member) -> u32 {
        debug_assert!(!self.contains_key(&member.node()));
        // At most `u32::MAX` members: the caller's table limit is far below.
        let i = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let hash = self.hash(&member.node());
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .insert_unique(hash, i, |&j| hasher.hash_one(slots[j as usize].node()));
        self.slots.push(member);
        i
    }

    /// Takes `node` out; the last member moves into its slot.
    fn remove(&mut self, node: &NodeId) -> Option<Removed> {
        let slots = &self.slots;
        let entry = self
            .index
            .find_entry(self.hash(node), |&i| slots[i as usize].node() == *node)
            .ok()?;
        let (slot, _) = entry.remove();
        let member = self.slots.swap_remove(slot as usize);
        let mut moved_from = None;
        if let Some(moved) = self.slots.get(slot as usize) {
            let last = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
            let hash = self.hash(&moved.node());
            if let Some(i) = self.index.find_mut(hash, |&i| i == last) {
                *i = slot;
            }
            moved_from = Some(last);
        }
        Some(Removed {
            member,
            slot,
            moved_from,
        })
    }

    fn keys(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.slots.iter().map(Member::node)
    }

    fn values(&self) -> std::slice::Iter<'_, Member> {
        self.slots.iter()
    }
}

/// A map from node to value that forgets its oldest insertions beyond a capacity.
#[derive(Debug, Clone)]
struct FifoMap<V> {
    map: HashMap<NodeId, V>,
    order: VecDeque<NodeId>,
    cap: usize,
}

impl<V> FifoMap<V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn insert(&mut self, key: NodeId, value: V) {
        if self.map.insert(key, value).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        // Keys removed out of order leave stale entries in `order`; compact now and then.
        if self.order.len() > 2 * self.cap {
            let map = &self.map;
            let mut seen = std::collections::HashSet::new();
            self.order
                .retain(|k| map.contains_key(k) && seen.insert(*k));
        }
    }

    fn get(&self, key: &NodeId) -> Option<&V> {
        self.map.get(key)
    }

    fn remove(&mut self, key: &NodeId) -> Option<V> {
        self.map.remove(key)
    }

    fn retain(&mut self, mut keep: impl FnMut(&NodeId, &V) -> bool) {
        self.map.retain(|k, v| keep(k, v));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A member that left: adverts up to `seq` do not bring it back.
#[derive(Debug, Clone, Copy)]
struct Departed {
    seq: u64,
    at: Millis,
}

/// A member snapshot being walked page by page.
#[derive(Debug, Clone, Copy)]
struct SnapshotWalk {
    last_next: NodeId,
    pages: usize,
    started: Millis,
}

/// The most snapshot walks followed at once.
const MAX_SNAPSHOT_WALKS: usize = 64;

/// How many of the highest-ranked members a full table looks through for one that never
/// served (members that served stay); beyond that a newcomer does not get in.
const EVICTION_SCAN: usize = 256;

/// A 64-bit mixer (splitmix64's finaliser) for [`Membership::rank`].
fn rank_mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Where an advert came from.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// Gossip, from the node or a relay.
    Gossip,
    /// A snapshot page: the advert was last heard of at this time.
    Snapshot(Millis),
}

/// One domain as this node sees it; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Membership {
    config: Config,
    manifest: Signed<DomainManifest>,
    domain: DomainId,
    key: SecretKey,
    local: NodeId,
    rng: SeededRng,
    members: Table,
    /// The key of this node's ranking of members (see [`Membership::rank`]), drawn at random.
    rank_key: [u64; 2],
    /// `(rank, slot)` of every member, for the view of a full table.
    by_rank: BTreeSet<(u64, u32)>,
    /// The highest rank in `by_rank` (read for every advert of a full table).
    top_rank: Option<u64>,
    /// Members that are not routable.
    unroutable: BTreeSet<NodeId>,
    /// Members that served this node (`Member::served` above zero): the eviction scan skips
    /// them without a table lookup.
    served: BTreeSet<NodeId>,
    /// [`Membership::domain_size_estimate`], kept as the table changes.
    size_estimate: u64,
    /// `(filed, slot)` of every member, `filed` at most its `last_heard`: the next to fall
    /// silent is at or after the first. An advert does not re-file its member (a re-advert is
    /// the commonest event of a domain, and re-filing it was two tree operations on a table
    /// nobody's cache holds); a tick that finds an entry due re-files the members heard since
    /// (see [`Membership::on_tick`]).
    by_heard: BTreeSet<(Millis, u32)>,
    /// `(certificate expiry, node)` of every member with a certificate.
    by_expiry: BTreeSet<(u64, NodeId)>,
    departed: FifoMap<Departed>,
    revocations: HashMap<(NodeId, u64), Signed<Revocation>>,
    revocations_by_age: BTreeSet<(u64, NodeId, u64)>,
    pending_certificates: FifoMap<SharedCertificate>,
    snapshot_walks: HashMap<NodeId, SnapshotWalk>,
    service: Option<LocalService>,
    local_certificate: Option<SharedCertificate>,
    published: Option<SharedAdvert>,
    last_seq: u64,
    last_publish_at: Option<Millis>,
    next_publish: Option<Millis>,
    /// The heartbeat planned at the last publish and the interval it was planned for (see
    /// [`Membership::replan_heartbeat`]).
    planned: Option<(Millis, u64)>,
    status: LocalStatus,
}

impl Membership {
    /// The membership of the domain `manifest` describes, for the node with `key`.
    ///
    /// The manifest must be validly signed by the operator it names; later versions are only
    /// accepted from the same operator. `seed` drives the heartbeat jitter.
    pub fn new(
        config: Config,
        manifest: Signed<DomainManifest>,
        key: SecretKey,
        seed: u64,
    ) -> Result<Self, NewError> {
        config.check()?;
        manifest.verify()?;
        manifest.payload.validate()?;
        let domain = manifest.payload.id();
        let local = key.node_id();
        let mut rng = SeededRng::new(seed);
        let rank_key = [rng.next_u64(), rng.next_u64()];
        Ok(Self {
            departed: FifoMap::new(config.max_members),
            pending_certificates: FifoMap::new(config.max_pending_certificates),
            config,
            manifest,
            domain,
            key,
            local,
            rng,
            members: Table::new(rank_key[0] ^ rank_key[1].rotate_left(29)),
            rank_key,
            by_rank: BTreeSet::new(),
            top_rank: None,
            unroutable: BTreeSet::new(),
            served: BTreeSet::new(),
            size_estimate: 1,
            by_heard: BTreeSet::new(),
            by_expiry: BTreeSet::new(),
            revocations: HashMap::new(),
            revocations_by_age: BTreeSet::new(),
            snapshot_walks: HashMap::new(),
            service: None,
            local_certificate: None,
            published: None,
            last_seq: 0,
            last_publish_at: None,
            next_publish: None,
            planned: None,
            status: LocalStatus::Idle,
        })
    }

    /// Handles `event` at `now`, appending what to do to `actions`. Returns the verdict on the
    /// message the event carried.
    pub fn handle(&mut self, now: Millis, event: Event, actions: &mut Vec<Action>) -> Verdict {
        let (peer, verdict) = match event {
            Event::AdvertReceived {
                from,
                advert,
                certificate,
            } => {
                let node = advert.payload.node;
                match self.on_advert(now, Via::Gossip, advert, certificate, actions) {
                    // A view-dependent rejection of a relayed advert: not the relay's fault.
                    Verdict::Reject(rejection) if from != node && !rejection.is_forgery() => (
                        None,
                        Verdict::Ignore(Ignored::NotUsable(rejection.to_string())),
                    ),
                    verdict => (Some(from), verdict),
                }
            }
            Event::CertificateReceived { from, certificate } => {
                (from, self.on_certificate(now, certificate, actions))
            }
            Event::RevocationReceived { from, revocation } => {
                (from, self.on_revocation(now, revocation, actions))
            }
            Event::ManifestReceived { from, manifest } => {
                (from, self.on_manifest(now, manifest, actions))
            }
            Event::SnapshotReceived {
                from,
                domain,
                members,
                next,
            } => (
                Some(from),
                self.on_snapshot(now, from, domain, members, next, actions),
            ),
            Event::LocalAdvertChanged(service) => {
                self.on_local_change(now, service, actions);
                (None, Verdict::Accept)
            }
            Event::Tick => {
                self.on_tick(now, actions);
                (None, Verdict::Accept)
            }
            Event::Served(node) => {
                if let Some(member) = self.members.get_mut(&node) {
                    member.served = member.served.saturating_add(1);
                    self.served.insert(node);
                }
                (None, Verdict::Accept)
            }
        };
        if let (Some(peer), Verdict::Reject(reason)) = (peer, &verdict) {
            actions.push(Action::Penalise {
                peer,
                reason: reason.clone(),
            });
        }
        verdict
    }

    /// How often this node publishes its advert now, in milliseconds: the configured heartbeat,
    /// or longer in a domain too large for it ([`Config::max_adverts_per_s`]).
    pub fn heartbeat_ms(&self) -> u64 {
        self.config.heartbeat_ms.max(self.stretched_ms())
    }

    /// The longest interval between two adverts that keeps the domain within its advert
    /// budget: adverts go out after a uniform 1/2 to 1 of it, 3/4 on average, so
    /// `members x 1 000 / max_adverts_per_s` on average.
    fn stretched_ms(&self) -> u64 {
        let members = self.size_estimate;
        members.saturating_mul(4000) / (3 * u64::from(self.config.max_adverts_per_s.max(1)))
    }

    /// How many nodes the domain has, this node included, as far as this node can tell: its
    /// table's size plus one while the table has room; once it is full, the table is the
    /// members of lowest rank, a uniform sample whose highest rank tells how much of the
    /// domain it covers (a bottom-k estimate: `(k - 1) x 2^64 / highest rank`).
    pub fn domain_size_estimate(&self) -> u64 {
        self.size_estimate
    }

    fn estimate_size(&self) -> u64 {
        let held = self.members.len() as u64 + 1;
        if self.members.len() < self.config.max_members || self.members.len() < 2 {
            return held;
        }
        let Some(highest) = self.top_rank else {
            return held;
        };
        let covered = (highest as f64 + 1.0) / 18_446_744_073_709_551_616.0;
        let estimate = (self.members.len() - 1) as f64 / covered;
        (estimate as u64).clamp(held, 1 << 32)
    }

    /// This node's rank of `node`: a hash of its address under a key only this node knows.
    /// A full table keeps the members of lowest rank, so the members it holds are a uniform
    /// sample of the domain that nobody can steer by choosing addresses, and different nodes
    /// hold different samples (every member is in about as many tables as any other).
    pub fn rank(&self, node: &NodeId) -> u64 {
        let bytes = &node.0;
        let mut words = [0u64; 3];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(buf);
        }
        let mut h = self.rank_key[0];
        for word in words {
            h = rank_mix(h ^ word ^ self.rank_key[1]);
        }
        rank_mix(h ^ self.rank_key[0].rotate_left(17))
    }

    /// Whether this node's table would keep `node` if it announced itself now: there is room,
    /// or it ranks below the highest-ranked member that could make way.
    pub fn would_keep(&self, node: &NodeId) -> bool {
        if self.members.contains_key(node) || self.members.len() < self.config.max_members {
            return true;
        }
        !self.unroutable.is_empty()
            || self
                .eviction_candidate()
                .is_some_and(|(rank, _)| self.rank(node) < rank)
    }

    /// The member a routable newcomer may replace in a full table, with its rank: the
    /// highest-ranked member that never served this node (members that served stay).
    fn eviction_candidate(&self) -> Option<(u64, NodeId)> {
        self.by_rank
            .iter()
            .rev()
            .take(EVICTION_SCAN)
            .map(|&(rank, slot)| (rank, self.members.at(slot).node()))
            .find(|(_, node)| !self.served.contains(node))
    }

    /// How long a member may stay silent now, in milliseconds: [`Config::silent_heartbeats`]
    /// times [`heartbeat_ms`](Self::heartbeat_ms).
    pub fn silence_ms(&self) -> u64 {
        self.heartbeat_ms()
            .saturating_mul(u64::from(self.config.silent_heartbeats))
    }

    /// The oldest advert accepted now, in milliseconds between its `sent_at` and now: the
    /// silence window plus the tolerated clock skew.
    pub fn max_advert_age_ms(&self) -> u64 {
        self.silence_ms()
            .saturating_add(self.config.max_clock_skew_secs.saturating_mul(1000))
    }

    /// When the caller should send the next [`Event::Tick`]: the next heartbeat, or the first
    /// time a member falls silent or its certificate expires. `None` when nothing is pending.
    /// Logarithmic in the table's size.
    pub fn next_wakeup(&self) -> Option<Millis> {
        let silent = self
            .by_heard
            .first()
            .map(|(heard, _)| heard.plus(self.silence_ms()));
        let expiry = self
            .by_expiry
            .first()
            .filter(|_| self.requires_certificate())
            .map(|(expires_at, _)| Millis::from_secs(*expires_at));
        [silent, expiry, self.next_publish]
            .into_iter()
            .flatten()
            .min()
    }

    /// The domain's id.
    pub fn domain(&self) -> DomainId {
        self.domain
    }

    /// The domain's manifest (the highest verified version).
    pub fn manifest(&self) -> &DomainManifest {
        &self.manifest.payload
    }

    /// The domain's manifest with the operator's signature, to pass on to peers.
    pub fn signed_manifest(&self) -> &Signed<DomainManifest> {
        &self.manifest
    }

    /// This node's address.
    pub fn local_node(&self) -> NodeId {
        self.local
    }

    /// This node's standing in the domain.
    pub fn local_status(&self) -> &LocalStatus {
        &self.status
    }

    /// This node's last published advert with its certificate, while it serves.
    pub fn local_entry(&self) -> Option<MemberEntry> {
        self.published.as_ref().map(|advert| MemberEntry {
            advert: advert.clone(),
            certificate: self
                .local_certificate
                .clone()
                .filter(|_| self.requires_certificate()),
        })
    }

    /// The members (not this node), in no particular order (not by address).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The member `node`, if in the table.
    pub fn member(&self, node: &NodeId) -> Option<&Member> {
        self.members.get(node)
    }

    /// The number of members in the table (not counting this node).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The nodes requests may be routed to: routable members, and this node while it serves
    /// and meets the requirements. In address order, this node first.
    pub fn candidates(&self) -> impl Iterator<Item = Candidate<'_>> {
        self.local_candidate().into_iter().chain(
            self.members
                .values()
                .filter(|m| m.is_routable())
                .map(|m| Candidate::from_advert(&m.advert.payload)),
        )
    }

    /// This node's own advert as a candidate, when it serves.
    fn local_candidate(&self) -> Option<Candidate<'_>> {
        self.published
            .as_ref()
            .filter(|_| self.status == LocalStatus::Serving)
            .map(|advert| Candidate::from_advert(&advert.payload))
    }

    /// The revocations this node verified (at most [`Config::max_revocations`]), to persist
    /// and pass on.
    pub fn revocations(&self) -> impl Iterator<Item = &Signed<Revocation>> {
        self.revocations.values()
    }

    /// The number of revocations held.
    pub fn revocation_count(&self) -> usize {
        self.revocations.len()
    }

    /// The answer to a domain-state request starting after `after`: the manifest (first page)
    /// and the revocations, as many as fit in one response.
    pub fn domain_state_page(
        &self,
        after: Option<(NodeId, u64)>,
    ) -> Result<ControlResponse, EncodeError> {
        ControlResponse::domain_state_page(&self.manifest, self.revocations.values(), after)
    }

    /// Whether the operator revoked certificate `serial` of `member`.
    pub fn is_revoked(&self, member: &NodeId, serial: u64) -> bool {
        self.revocations.contains_key(&(*member, serial))
    }

    /// The answer to a member snapshot request starting after `after`: members (and this
    /// node) in address order, as many as fit in one response.
    pub fn member_page(&self, after: Option<NodeId>) -> Result<ControlResponse, EncodeError> {
        // One more than fits, so that the page says where the next one starts. Pages are
        // asked for rarely (by a joining node): a pass over the table is cheaper than keeping
        // it in address order for every advert.
        let mut page: Vec<NodeId> = self
            .members
            .keys()
            .filter(|node| after.is_none_or(|after| *node > after))
            .collect();
        let want = MAX_MEMBERS_PER_PAGE + 1;
        if page.len() > want {
            page.select_nth_unstable(want - 1);
            page.truncate(want);
        }
        page.sort_unstable();
        let mut entries: Vec<MemberEntry> = page
            .into_iter()
            .filter_map(|node| self.members.get(&node).map(Member::entry))
            .collect();
        if let Some(local) = self.local_entry()
            && after.is_none_or(|after| self.local > after)
        {
            entries.push(local);
        }
        ControlResponse::member_page(self.domain, &entries, after)
    }

    fn requires_certificate(&self) -> bool {
        !matches!(self.manifest.payload.admission, Admission::Open)
    }

    fn on_advert(
        &mut self,
        now: Millis,
        via: Via,
        advert: SharedAdvert,
        certificate: Option<SharedCertificate>,
        actions: &mut Vec<Action>,
    ) -> Verdict {
        let payload = &advert.payload;
        let node = payload.node;
        if let Err(error) = payload.validate() {
            return Verdict::Reject(Rejection::Invalid {
                what: "advert",
                error,
            });
        }
        if payload.domain != self.domain {
            return Verdict::Reject(Rejection::WrongDomain {
                what: "advert",
                expected: self.domain,
                got: payload.domain,
            });
        }
        if advert.signer != node {
            return Verdict::Reject(Rejection::NotAuthor {
                node,
                signer: advert.signer,
            });
        }
        if node == self.local {
            return Verdict::Ignore(Ignored::Own);
        }
        let now_secs = now.as_secs();
        if payload.sent_at > now_secs.saturating_add(self.config.max_clock_skew_secs) {
            let rejection = Rejection::ClockSkew {
                node,
                sent_at: payload.sent_at,
                now: now_secs,
                limit: self.config.max_clock_skew_secs,
            };
            return match via {
                Via::Gossip => Verdict::Reject(rejection),
                // The relay may run another clock: not its fault.
                Via::Snapshot(_) => Verdict::Ignore(Ignored::NotUsable(rejection.to_string())),
            };
        }
        let age_secs = now_secs.saturating_sub(payload.sent_at);
        let replay_after_ms = self
            .max_advert_age_ms()
            .saturating_add(self.config.max_clock_skew_secs.saturating_mul(1000));
        if matches!(via, Via::Gossip) && age_secs.saturating_mul(1000) > replay_after_ms {
            return Verdict::Reject(Rejection::Replayed {
                node,
                sent_at: payload.sent_at,
                now: now_secs,
                window_secs: self.max_advert_age_ms() / 1000,
            });
        }
        if age_secs.saturating_mul(1000) > self.max_advert_age_ms() {
            return Verdict::Ignore(Ignored::TooOld {
                sent_at: payload.sent_at,
                now: now_secs,
            });
        }
        // A full table holds no member ranked above its highest: most adverts of a domain
        // larger than the table need no lookup.
        let full = self.members.len() >= self.config.max_members;
        let above_table = full && self.top_rank.is_some_and(|top| self.rank(&node) > top);
        let known = if above_table {
            None
        } else {
            self.members.get(&node)
        };
        if let Some(member) = known {
            let latest = member.advert.payload.seq;
            if payload.seq < latest {
                return Verdict::Ignore(Ignored::Stale {
                    seq: payload.seq,
                    latest,
                });
            }
            if payload.seq == latest && member.advert == advert {
                return Verdict::Ignore(Ignored::Duplicate);
            }
        } else if self
            .departed
            .get(&node)
            .is_some_and(|d| payload.seq <= d.seq)
        {
            return Verdict::Ignore(Ignored::Departed);
        }
        if !self.manifest.payload.admission.admits(&node) {
            return Verdict::Reject(Rejection::NotAdmitted { node });
        }
        if let Err(err) = advert.verify() {
            return Verdict::Reject(Rejection::BadSignature {
                what: "advert",
                reason: err.to_string(),
            });
        }
        if let Some(member) = known
            && payload.seq == member.advert.payload.seq
        {
            // Same number, different content, both validly signed.
            return Verdict::Reject(Rejection::Equivocation {
                node,
                seq: payload.seq,
            });
        }

        let certificate = if self.requires_certificate() {
            let certificate = certificate
                .or_else(|| known.and_then(|m| m.certificate.clone()))
                .or_else(|| self.pending_certificates.get(&node).cloned());
            let Some(certificate) = certificate else {
                return Verdict::Reject(Rejection::MissingCertificate { node });
            };
            let verified_before = known.and_then(|m| m.certificate.as_ref()) == Some(&certificate);
            if let Err(reason) = self.check_certificate(node, &certificate, now, verified_before) {
                return Verdict::Reject(Rejection::BadCertificate { node, reason });
            }
            Some(certificate)
        } else {
            None
        };

        if advert.payload.leaving {
            self.record_departed(node, advert.payload.seq, now);
            self.pending_certificates.remove(&node);
            if self.remove_member(&node).is_some() {
                actions.push(Action::MemberLeft {
                    node,
                    reason: LeaveReason::Left,
                });
            }
            return Verdict::Accept;
        }

        let unroutable = Unroutable::check(&self.manifest.payload, &advert.payload).map(Box::new);
        let heard = match via {
            Via::Gossip => now,
            Via::Snapshot(heard) => heard,
        };
        if known.is_none() && self.members.len() >= self.config.max_members {
            // Make room only for a routable member: at the cost of one that is not, else of the
            // highest-ranked member that never served this node, if the newcomer ranks below
            // it. The table then holds the members of lowest rank under a key only this node
            // knows: a flood of self-made identities gets no more of it than its share of the
            // domain, cannot choose whom it evicts, and the table does not churn as members
            // re-advertise. Members that served are never evicted for a newcomer.
            let victim = if unroutable.is_some() {
                None
            } else if let Some(&node) = self.unroutable.first() {
                Some(node)
            } else {
                let rank = self.rank(&node);
                // Most adverts of a large domain rank above the whole table: no scan for them.
                let above_all = self.top_rank.is_none_or(|top| rank >= top);
                (!above_all)
                    .then(|| self.eviction_candidate())
                    .flatten()
                    .filter(|(highest, _)| rank < *highest)
                    .map(|(_, victim)| victim)
            };
            let Some(victim) = victim else {
                return Verdict::Ignore(Ignored::TableFull {
                    limit: self.config.max_members,
                });
            };
            self.remove_member(&victim);
            actions.push(Action::MemberLeft {
                node: victim,
                reason: LeaveReason::Evicted,
            });
        }
        self.pending_certificates.remove(&node);
        let routable = unroutable.is_none();
        match self.members.get(&node) {
            Some(member) => {
                let old = &member.advert.payload;
                let new = &advert.payload;
                let changed = old.model_name != new.model_name
                    || old.model_hash != new.model_hash
                    || old.kb_hash != new.kb_hash
                    || old.prompt_hash != new.prompt_hash
                    || old.capabilities != new.capabilities
                    || old.price() != new.price()
                    || old.addrs != new.addrs
                    || member.unroutable != unroutable;
                let updated = Member {
                    advert,
                    certificate,
                    last_heard: member.last_heard.max(heard),
                    filed: member.filed,
                    joined_at: member.joined_at,
                    unroutable,
                    served: member.served,
                };
                self.insert_member(updated);
                if changed {
                    actions.push(Action::MemberUpdated { node, routable });
                }
            }
            None => {
                self.insert_member(Member {
                    advert,
                    certificate,
                    last_heard: heard,
                    filed: heard,
                    joined_at: now,
                    unroutable,
                    served: 0,
                });
                actions.push(Action::MemberJoined { node, routable });
            }
        }
        Verdict::Accept
    }

    /// Checks that `certificate` admits `node` at `now`: the operator's signature (skipped when
    /// `verified_before`), the domain, the admission policy, the validity period, revocations.
    fn check_certificate(
        &self,
        node: NodeId,
        certificate: &Signed<MembershipCertificate>,
        now: Millis,
        verified_before: bool,
    ) -> Result<(), String> {
        let cert = &certificate.payload;
        if cert.member != node {
            return Err(format!("it was issued to {}, not to {node}", cert.member));
        }
        let manifest = &self.manifest.payload;
        let checked = if verified_before {
            if manifest.admission.admits(&node) {
                cert.check_time(now.as_secs())
            } else {
                Err(MembershipError::NotAdmitted { member: node })
            }
        } else {
            manifest.verify_certificate(certificate, now.as_secs())
        };
        checked.map_err(|err| err.to_string())?;
        if self.is_revoked(&node, cert.serial) {
            return Err(format!(
                "certificate {} was revoked by the operator",
                cert.serial
            ));
        }
        Ok(())
    }

    fn on_certificate(
        &mut self,
        now: Millis,
        certificate: Signed<MembershipCertificate>,
        actions: &mut Vec<Action>,
    ) -> Verdict {
        let certificate = SharedCertificate::new(certificate);
        let cert = &certificate.payload;
        if let Err(error) = cert.validate() {
            return Verdict::Reject(Rejection::Invalid {
                what: "membership certificate",
                error,
            });
        }
        if cert.domain != self.domain {
            return Verdict::Reject(Rejection::WrongDomain {
                what: "membership certificate",
                expected: self.domain,
                got: cert.domain,
            });
        }
        if let Err(err) = certificate.verify_signed_by(self.manifest.payload.operator) {
            return Verdict::Reject(Rejection::BadSignature {
                what: "membership certificate",
                reason: err.to_string(),
            });
        }
        let member = cert.member;
        if let Err(reason) = self.check_certificate(member, &certificate, now, true) {
            return Verdict::Ignore(Ignored::NotUsable(reason));
        }
        let better = |current: Option<&Signed<MembershipCertificate>>| {
            current.is_none_or(|c| {
                c.payload.expires_at < cert.expires_at
                    || self.check_certificate(member, c, now, true).is_err()
            })
        };
        if member == self.local {
            if !better(self.local_certificate.as_deref()) {
                return Verdict::Ignore(Ignored::Duplicate);
            }
            self.local_certificate = Some(certificate);
            if matches!(self.status, LocalStatus::Blocked(_)) && self.service.is_some() {
                self.publish(now, actions);
            }
        } else if let Some(current) = self.members.get(&member) {
            if !better(current.certificate.as_deref()) {
                return Verdict::Ignore(Ignored::Duplicate);
            }
            if let Some(mut m) = self.remove_member(&member) {
                m.certificate = Some(certificate);
                self.insert_member(m);
            }
        } else {
            if !better(self.pending_certificates.get(&member).map(|c| &**c)) {
                return Verdict::Ignore(Ignored::Duplicate);
            }
            self.pending_certificates.insert(member, certificate);
        }
        Verdict::Accept
    }

    fn on_revocation(
        &mut self,
        now: Millis,
        revocation: Signed<Revocation>,
        actions: &mut Vec<Action>,
    ) -> Verdict {
        if let Err(err) = self.manifest.payload.verify_revocation(&revocation) {
            return Verdict::Reject(match err {
                MembershipError::WrongDomain { expected, got } => Rejection::WrongDomain {
                    what: "revocation",
                    expected,
                    got,
                },
                other => Rejection::BadSignature {
                    what: "revocation",
                    reason: other.to_string(),
                },
            });
        }
        let rev = &revocation.payload;
        let key = (rev.member, rev.serial);
        if self.revocations.contains_key(&key) {
            return Verdict::Ignore(Ignored::Duplicate);
        }
        self.revocations.insert(key, revocation.clone());
        self.revocations_by_age
            .insert((rev.revoked_at, rev.member, rev.serial));
        while self.revocations.len() > self.config.max_revocations {
            let Some((_, member, serial)) = self.revocations_by_age.pop_first() else {
                break;
            };
            self.revocations.remove(&(member, serial));
        }

        let revokes = |c: &Signed<MembershipCertificate>| c.payload.is_revoked_by(rev);
        if self
            .members
            .get(&rev.member)
            .and_then(|m| m.certificate.as_deref())
            .is_some_and(revokes)
            && let Some(member) = self.remove_member(&rev.member)
        {
            self.record_departed(rev.member, member.advert.payload.seq, now);
            actions.push(Action::MemberLeft {
                node: rev.member,
                reason: LeaveReason::Revoked,
            });
        }
        if self
            .pending_certificates
            .get(&rev.member)
            .is_some_and(|c| revokes(c))
        {
            self.pending_certificates.remove(&rev.member);
        }
        if self.local_certificate.as_deref().is_some_and(revokes) {
            self.local_certificate = None;
            if self.service.is_some() && self.requires_certificate() {
                self.published = None;
                let reason = format!("certificate {} was revoked by the operator", rev.serial);
                self.set_status(
                    LocalStatus::Blocked(LocalIssue::BadCertificate(reason)),
                    actions,
                );
            }
        }
        Verdict::Accept
    }

    fn on_manifest(
        &mut self,
        now: Millis,
        manifest: Signed<DomainManifest>,
        actions: &mut Vec<Action>,
    ) -> Verdict {
        let current = &self.manifest.payload;
        if let Err(err) = manifest.verify_signed_by(current.operator) {
            return Verdict::Reject(Rejection::BadSignature {
                what: "domain manifest",
                reason: err.to_string(),
            });
        }
        if let Err(error) = manifest.payload.validate() {
            return Verdict::Reject(Rejection::Invalid {
                what: "domain manifest",
                error,
            });
        }
        if manifest.payload.id() != self.domain {
            return Verdict::Reject(Rejection::WrongDomain {
                what: "domain manifest",
                expected: self.domain,
                got: manifest.payload.id(),
            });
        }
        if manifest.payload.version <= current.version {
            return Verdict::Ignore(if manifest == self.manifest {
                Ignored::Duplicate
            } else {
                Ignored::OldManifest {
                    version: manifest.payload.version,
                    current: current.version,
                }
            });
        }
        let version = manifest.payload.version;
        self.manifest = manifest;
        actions.push(Action::ManifestUpdated { version });

        // Re-check every member against the new admission policy and requirements.
        let requires_certificate = self.requires_certificate();
        let mut gone = Vec::new();
        let mut updated = Vec::new();
        let mut uncertified = Vec::new();
        for member in self.members.values() {
            let node = member.node();
            if !self.manifest.payload.admission.admits(&node) {
                gone.push((node, LeaveReason::NotAdmitted));
                continue;
            }
            if requires_certificate {
                let valid = member
                    .certificate
                    .as_ref()
                    .is_some_and(|c| self.check_certificate(node, c, now, false).is_ok());
                if !valid {
                    gone.push((node, LeaveReason::NotAdmitted));
                    continue;
                }
            } else if member.certificate.is_some() {
                // Certificates are kept only where the domain requires them.
                uncertified.push(node);
            }
            let unroutable =
                Unroutable::check(&self.manifest.payload, member.advert()).map(Box::new);
            if unroutable != member.unroutable {
                updated.push((node, unroutable));
            }
        }
        for (node, reason) in gone {
            if let Some(member) = self.remove_member(&node) {
                self.record_departed(node, member.advert.payload.seq, now);
                actions.push(Action::MemberLeft { node, reason });
            }
        }
        for node in uncertified {
            if let Some(mut member) = self.remove_member(&node) {
                member.certificate = None;
                self.insert_member(member);
            }
        }
        for (node, unroutable) in updated {
            if let Some(mut member) = self.remove_member(&node) {
                let routable = unroutable.is_none();
                member.unroutable = unroutable;
                self.insert_member(member);
                actions.push(Action::MemberUpdated { node, routable });
            }
        }
        // This node's own standing may have changed: republish now.
        if self.service.is_some() {
            self.publish(now, actions);
        }
        Verdict::Accept
    }

    fn on_snapshot(
        &mut self,
        now: Millis,
        from: NodeId,
        domain: DomainId,
        members: Vec<MemberEntry>,
        next: Option<NodeId>,
        actions: &mut Vec<Action>,
    ) -> Verdict {
        if domain != self.domain {
            return Verdict::Reject(Rejection::WrongDomain {
                what: "member snapshot",
                expected: self.domain,
                got: domain,
            });
        }
        if members.len() > MAX_MEMBERS_PER_PAGE {
            return Verdict::Reject(Rejection::Invalid {
                what: "member snapshot",
                error: ValidationError::TooMany {
                    field: "members",
                    count: members.len(),
                    limit: MAX_MEMBERS_PER_PAGE,
                },
            });
        }
        // An honest page's `next` is its last (highest) address.
        let progressed = members
            .iter()
            .map(MemberEntry::node)
            .max()
            .is_some_and(|highest| next.is_none_or(|next| next >= highest));
        let now_secs = now.as_secs();
        let mut forgery = None;
        for entry in members {
            // Dated by its `sent_at`, but with at least one heartbeat left before it counts as
            // silent (the two clocks may differ).
            let age_ms = now_secs
                .saturating_sub(entry.advert.payload.sent_at)
                .saturating_mul(1000)
                .min(self.silence_ms().saturating_sub(self.heartbeat_ms()));
            let heard = Millis(now.0.saturating_sub(age_ms));
            let verdict = self.on_advert(
                now,
                Via::Snapshot(heard),
                entry.advert,
                entry.certificate,
                actions,
            );
            if let Verdict::Reject(rejection) = verdict
                && rejection.is_forgery()
                && forgery.is_none()
            {
                forgery = Some(rejection);
            }
        }

        // Follow the pages while they make progress, within bounds.
        match next {
            Some(next) if progressed && forgery.is_none() => {
                let max_pages = self.config.max_members;
                let walk = self.snapshot_walks.get(&from).copied();
                let follow = match walk {
                    Some(walk) => next > walk.last_next && walk.pages < max_pages,
                    None => self.snapshot_walks.len() < MAX_SNAPSHOT_WALKS,
                };
                if follow {
                    let walk = SnapshotWalk {
                        last_next: next,
                        pages: walk.map_or(1, |w| w.pages + 1),
                        started: walk.map_or(now, |w| w.started),
                    };
                    self.snapshot_walks.insert(from, walk);
                    actions.push(Action::RequestSnapshot {
                        peer: from,
                        after: Some(next),
                    });
                } else {
                    self.snapshot_walks.remove(&from);
                }
            }
            _ => {
                self.snapshot_walks.remove(&from);
            }
        }
        forgery.map_or(Verdict::Accept, Verdict::Reject)
    }

    fn on_local_change(
        &mut self,
        now: Millis,
        service: Option<LocalService>,
        actions: &mut Vec<Action>,
    ) {
        let Some(service) = service else {
            self.service = None;
            self.publish_leaving(now, actions);
            return;
        };
        let significant = self
            .service
            .as_ref()
            .is_none_or(|old| !old.same_offer(&service))
            || self.published.is_none();
        self.service = Some(service);
        if !significant {
            // Load alone: the next heartbeat carries it.
            return;
        }
        let earliest = self
            .last_publish_at
            .map_or(now, |t| t.plus(self.config.min_publish_interval_ms));
        if now >= earliest {
            self.publish(now, actions);
        } else {
            self.next_publish = Some(self.next_publish.map_or(earliest, |t| t.min(earliest)));
        }
    }

    fn on_tick(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let silence = self.silence_ms();
        let now_secs = now.as_secs();
        let requires_certificate = self.requires_certificate();
        // Entries due now or within a quarter of the silence: members silent since are gone,
        // the others are re-filed under when they were last heard. A tick then comes at most
        // four times per silence window for entries that turn out not due.
        let slack = silence / 4;
        let mut silent = Vec::new();
        let mut refile = Vec::new();
        for &(filed, slot) in &self.by_heard {
            if now.since(filed).saturating_add(slack) < silence {
                break;
            }
            let member = self.members.at(slot);
            if now.since(member.last_heard) >= silence {
                silent.push((member.node(), LeaveReason::Silent));
            } else if member.last_heard != filed {
                refile.push((filed, slot, member.last_heard));
            }
        }
        for (filed, slot, heard) in refile {
            self.by_heard.remove(&(filed, slot));
            self.by_heard.insert((heard, slot));
            self.members.slots[slot as usize].filed = heard;
        }
        let expired = self
            .by_expiry
            .iter()
            .take_while(|(expires_at, _)| requires_certificate && now_secs >= *expires_at)
            .map(|&(_, node)| (node, LeaveReason::CertificateExpired));
        let gone: Vec<(NodeId, LeaveReason)> = silent.into_iter().chain(expired).collect();
        for (node, reason) in gone {
            if let Some(member) = self.remove_member(&node) {
                self.record_departed(node, member.advert.payload.seq, now);
                actions.push(Action::MemberLeft { node, reason });
            }
        }
        // A tombstone outlives every advert it must keep out: one sent before the departure
        // (give or take the clock skew) is acceptable for the acceptance window after that.
        let tombstone_ms = self
            .max_advert_age_ms()
            .saturating_add(self.config.max_clock_skew_secs.saturating_mul(1000));
        self.departed.retain(|_, d| now.since(d.at) < tombstone_ms);
        self.snapshot_walks
            .retain(|_, w| now.since(w.started) < silence);
        if self.next_publish.is_some_and(|at| now >= at) {
            self.publish(now, actions);
        }
    }

    /// Puts `member` in the table and its indexes (replacing any entry of the same node).
    fn insert_member(&mut self, member: Member) {
        let node = member.node();
        if let Some(held) = self.members.get_mut(&node) {
            // An update: the member's rank, and so the sample and the size estimate, stay; so
            // does its entry in `by_heard` (see there).
            debug_assert_eq!(held.filed, member.filed);
            let expiry = |m: &Member| m.certificate.as_ref().map(|c| c.payload.expires_at);
            let (before, after) = (expiry(held), expiry(&member));
            if before != after {
                if let Some(at) = before {
                    self.by_expiry.remove(&(at, node));
                }
                if let Some(at) = after {
                    self.by_expiry.insert((at, node));
                }
            }
            if member.unroutable.is_some() {
                self.unroutable.insert(node);
            } else {
                self.unroutable.remove(&node);
            }
            *held = member;
            return;
        }
        let rank = self.rank(&node);
        self.top_rank = Some(self.top_rank.map_or(rank, |top| top.max(rank)));
        if member.unroutable.is_some() {
            self.unroutable.insert(node);
        }
        if let Some(certificate) = &member.certificate {
            self.by_expiry
                .insert((certificate.payload.expires_at, node));
        }
        let filed = member.filed;
        let slot = self.members.push(member);
        self.by_heard.insert((filed, slot));
        self.by_rank.insert((rank, slot));
        self.size_estimate = self.estimate_size();
        self.replan_heartbeat();
    }

    /// Moves the next heartbeat later once the table is full and the domain turned out at
    /// least twice as large as when the heartbeat was planned. A node planning its first
    /// heartbeat knows little of its domain, so in the cold start of a domain larger than
    /// the tables every node would publish a second advert one plain heartbeat after its
    /// first: simulated with 10 000 nodes, a second flood of 10 000 adverts within ten
    /// seconds, fifty times the domain's advert budget. A full table is a sample of the
    /// domain, and a member missing from it costs nothing visible, so the stretched heartbeat
    /// is enough. A table with room keeps the plain first heartbeat: the adverts of the first
    /// nodes of a cold start reach only the few nodes up then, and that heartbeat is what
    /// completes the others' tables (simulated with 1 000 nodes: every table complete 8.5 s
    /// after the cold start with it, 38 s without). A publish for a change of the offer is
    /// never delayed.
    fn replan_heartbeat(&mut self) {
        let (Some(last), Some((at, interval))) = (self.last_publish_at, self.planned) else {
            return;
        };
        if self.members.len() < self.config.max_members || self.next_publish != Some(at) {
            return;
        }
        let stretched = self.heartbeat_ms();
        if stretched < interval.saturating_mul(2) {
            return;
        }
        let early = self.rng.below(stretched / 2 + 1);
        let later = last.plus(stretched - early).max(at);
        self.next_publish = Some(later);
        self.planned = Some((later, stretched));
    }

    /// Takes `node` out of the table and its indexes.
    fn remove_member(&mut self, node: &NodeId) -> Option<Member> {
        let Removed {
            member,
            slot,
            moved_from,
        } = self.members.remove(node)?;
        self.by_heard.remove(&(member.filed, slot));
        let rank = self.rank(node);
        self.by_rank.remove(&(rank, slot));
        if let Some(from) = moved_from {
            // The last member took the freed slot: its index entries follow it.
            let moved = self.members.at(slot);
            let (filed, moved_rank) = (moved.filed, self.rank(&moved.node()));
            self.by_heard.remove(&(filed, from));
            self.by_heard.insert((filed, slot));
            self.by_rank.remove(&(moved_rank, from));
            self.by_rank.insert((moved_rank, slot));
        }
        if self.top_rank == Some(rank) {
            self.top_rank = self.by_rank.last().map(|&(top, _)| top);
        }
        self.unroutable.remove(node);
        self.served.remove(node);
        self.size_estimate = self.estimate_size();
        if let Some(certificate) = &member.certificate {
            self.by_expiry
                .remove(&(certificate.payload.expires_at, *node));
        }
        Some(member)
    }

    /// Panics unless the indexes describe the table exactly (a test helper).
    #[cfg(test)]
    fn assert_indexes(&self) {
        let slots = || (0u32..).zip(self.members.values());
        let heard: BTreeSet<(Millis, u32)> = slots().map(|(i, m)| (m.filed, i)).collect();
        assert_eq!(heard, self.by_heard);
        assert!(self.members.values().all(|m| m.filed <= m.last_heard));
        let expiry: BTreeSet<(u64, NodeId)> = self
            .members
            .values()
            .filter_map(|m| Some((m.certificate.as_ref()?.payload.expires_at, m.node())))
            .collect();
        assert_eq!(expiry, self.by_expiry);
        let ranks: BTreeSet<(u64, u32)> = slots().map(|(i, m)| (self.rank(&m.node()), i)).collect();
        for (i, node) in (0u32..).zip(self.members.keys()) {
            assert_eq!(self.members.slot(&node), Some(i));
        }
        assert_eq!(self.members.index.len(), self.members.len());
        assert_eq!(ranks, self.by_rank);
        assert_eq!(self.top_rank, self.by_rank.last().map(|&(top, _)| top));
        let unroutable: BTreeSet<NodeId> = self
            .members
            .values()
            .filter(|m| !m.is_routable())
            .map(Member::node)
            .collect();
        assert_eq!(unroutable, self.unroutable);
        let served: BTreeSet<NodeId> = self
            .members
            .values()
            .filter(|m| m.served > 0)
            .map(Member::node)
            .collect();
        assert_eq!(served, self.served);
        if !self.requires_certificate() {
            assert!(self.by_expiry.is_empty());
        }
    }

    fn record_departed(&mut self, node: NodeId, seq: u64, now: Millis) {
        self.departed.insert(node, Departed { seq, at: now });
    }

    fn set_status(&mut self, status: LocalStatus, actions: &mut Vec<Action>) {
        if self.status != status {
            self.status = status.clone();
            actions.push(Action::LocalStatusChanged(status));
        }
    }

    /// This node's certificate, if the domain requires one and it is valid now.
    fn local_certificate_now(&self, now: Millis) -> Result<Option<SharedCertificate>, LocalIssue> {
        if !self.manifest.payload.admission.admits(&self.local) {
            return Err(LocalIssue::NotAdmitted);
        }
        if !self.requires_certificate() {
            return Ok(None);
        }
        let certificate = self
            .local_certificate
            .as_ref()
            .ok_or(LocalIssue::NoCertificate)?;
        self.check_certificate(self.local, certificate, now, false)
            .map_err(LocalIssue::BadCertificate)?;
        Ok(Some(certificate.clone()))
    }

    fn next_seq(&self, now: Millis) -> u64 {
        self.last_seq.saturating_add(1).max(now.0)
    }

    fn schedule_heartbeat(&mut self, now: Millis) {
        let interval = self.heartbeat_ms();
        // A stretched heartbeat comes after a uniform half to whole interval: a jitter of a
        // second would leave members that started together publishing in bursts (simulated:
        // 1 000 nodes sent 300 kB/s each for 15 s out of every 50, idle in between); this one
        // spreads them over the interval within a few heartbeats.
        let jitter = if interval > self.config.heartbeat_ms {
            interval / 2
        } else {
            self.config.jitter_ms
        };
        let early = self.rng.below(jitter.saturating_add(1));
        let at = now.plus(interval - early);
        self.next_publish = Some(at);
        self.planned = Some((at, interval));
    }

    fn publish(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let Some(service) = &self.service else {
            self.next_publish = None;
            return;
        };
        let certificate = match self.local_certificate_now(now) {
            Ok(certificate) => certificate,
            Err(issue) => {
                // Try again at the next heartbeat (a new certificate triggers it sooner).
                self.published = None;
                self.schedule_heartbeat(now);
                self.set_status(LocalStatus::Blocked(issue), actions);
                return;
            }
        };
        let seq = self.next_seq(now);
        let advert = service.to_advert(self.local, self.domain, seq, now.as_secs());
        let unroutable = Unroutable::check(&self.manifest.payload, &advert);
        let signed = match Signed::sign(advert, &self.key) {
            Ok(signed) => signed,
            Err(err) => {
                self.published = None;
                self.schedule_heartbeat(now);
                let issue = LocalIssue::InvalidAdvert(err.to_string());
                self.set_status(LocalStatus::Blocked(issue), actions);
                return;
            }
        };
        let signed = SharedAdvert::new(signed);
        self.last_seq = seq;
        self.last_publish_at = Some(now);
        self.published = Some(SharedAdvert::clone(&signed));
        self.schedule_heartbeat(now);
        let status = match unroutable {
            None => LocalStatus::Serving,
            Some(unroutable) => LocalStatus::NotRoutable(unroutable),
        };
        self.set_status(status, actions);
        actions.push(Action::Publish(MemberEntry {
            advert: signed,
            certificate,
        }));
    }

    fn publish_leaving(&mut self, now: Millis, actions: &mut Vec<Action>) {
        self.next_publish = None;
        if let Some(last) = self.published.take() {
            let seq = self.next_seq(now);
            let mut advert = SharedAdvert::unwrap_or_clone(last).payload;
            advert.seq = seq;
            advert.sent_at = now.as_secs();
            advert.leaving = true;
            // The same content signed before: signing cannot fail; if it did, members would
            // notice the silence instead.
            if let Ok(signed) = Signed::sign(advert, &self.key) {
                self.last_seq = seq;
                self.last_publish_at = Some(now);
                let certificate = self
                    .local_certificate
                    .clone()
                    .filter(|_| self.requires_certificate());
                actions.push(Action::Publish(MemberEntry {
                    advert: SharedAdvert::new(signed),
                    certificate,
                }));
            }
        }
        self.set_status(LocalStatus::Idle, actions);
    }
}

/// The router draws its candidates from the table by position: the local node first (when
/// it serves), then the table's slots.
impl CandidatePool for Membership {
    fn positions(&self) -> usize {
        usize::from(self.local_candidate().is_some()) + self.members.len()
    }

    fn at(&self, position: usize) -> Option<Candidate<'_>> {
        let local = self.local_candidate();
        let position = match (local, position) {
            (Some(local), 0) => return Some(local),
            (Some(_), p) => p - 1,
            (None, p) => p,
        };
        self.members
            .slots
            .get(position)
            .filter(|m| m.is_routable())
            .map(|m| Candidate::from_advert(&m.advert.payload))
    }

    fn all(&self) -> impl Iterator<Item = Candidate<'_>> {
        self.candidates()
    }

    fn get(&self, node: &NodeId) -> Option<Candidate<'_>> {
        match self.local_candidate() {
            Some(local) if local.node == *node => Some(local),
            _ => self
                .members
                .get(node)
                .filter(|m| m.is_routable())
                .map(|m| Candidate::from_advert(&m.advert.payload)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::test_support::{advert, certificate, key, manifest, many_key};

    const T0: u64 = 1_700_000_100;

    fn at(secs: u64) -> Millis {
        Millis::from_secs(T0 + secs)
    }

    struct Setup {
        operator: SecretKey,
        me: Membership,
        actions: Vec<Action>,
    }

    impl Setup {
        fn new(admission: Admission) -> Self {
            Self::with_config(admission, Config::default())
        }

        fn with_config(admission: Admission, config: Config) -> Self {
            let operator = key(100);
            let signed = Signed::sign(manifest(&operator, admission), &operator).unwrap();
            let me = Membership::new(config, signed, key(1), 7).unwrap();
            Self {
                operator,
                me,
                actions: Vec::new(),
            }
        }

        fn domain(&self) -> DomainId {
            self.me.domain()
        }

        fn handle(&mut self, now: Millis, event: Event) -> Verdict {
            let verdict = self.me.handle(now, event, &mut self.actions);
            self.me.assert_indexes();
            verdict
        }

        fn take(&mut self) -> Vec<Action> {
            std::mem::take(&mut self.actions)
        }

        fn signed_advert(&self, node: &SecretKey, seq: u64, sent_at: u64) -> Signed<Advert> {
            Signed::sign(advert(node.node_id(), self.domain(), seq, sent_at), node).unwrap()
        }

        fn cert(&self, node: &SecretKey, serial: u64) -> Signed<MembershipCertificate> {
            Signed::sign(
                certificate(self.domain(), node.node_id(), T0 - 100, serial),
                &self.operator,
            )
            .unwrap()
        }

        /// Gossips `node`'s advert `seq`, sent at `secs`, received at `secs`.
        fn gossip(
            &mut self,
            node: &SecretKey,
            seq: u64,
            secs: u64,
            cert: Option<Signed<MembershipCertificate>>,
        ) -> Verdict {
            let advert = self.signed_advert(node, seq, T0 + secs);
            self.handle(
                at(secs),
                Event::AdvertReceived {
                    from: node.node_id(),
                    advert: advert.into(),
                    certificate: cert.map(Into::into),
                },
            )
        }
    }

    fn service() -> LocalService {
        let a = advert(NodeId([0; 20]), DomainId([0; 32]), 0, 0);
        LocalService {
            price: a.price(),
            model_name: a.model_name,
            model_hash: a.model_hash,
            kb_hash: a.kb_hash,
            prompt_hash: a.prompt_hash,
            capabilities: a.capabilities,
            load: a.load,
            addrs: a.addrs,
        }
    }

    fn published(actions: &[Action]) -> Vec<&MemberEntry> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish(entry) => Some(entry),
                _ => None,
            })
            .collect()
    }

    fn assert_rejected(s: &mut Setup, verdict: Verdict, peer: NodeId) -> Rejection {
        let Verdict::Reject(reason) = verdict else {
            panic!("expected a rejection, got {verdict:?}");
        };
        let actions = s.take();
        assert!(
            actions.contains(&Action::Penalise {
                peer,
                reason: reason.clone()
            }),
            "{actions:?}"
        );
        reason
    }

    #[test]
    fn a_valid_advert_joins_an_open_domain() {
        let mut s = Setup::new(Admission::Open);
        let peer = key(2);
        assert_eq!(s.gossip(&peer, 1, 0, None), Verdict::Accept);
        assert_eq!(
            s.take(),
            vec![Action::MemberJoined {
                node: peer.node_id(),
                routable: true
            }]
        );
        let member = s.me.member(&peer.node_id()).unwrap();
        assert!(member.is_routable());
        assert_eq!(member.last_heard(), at(0));
        assert_eq!(member.advert().seq, 1);
        let candidates: Vec<NodeId> = s.me.candidates().map(|c| c.node).collect();
        assert_eq!(candidates, vec![peer.node_id()]);

        // A heartbeat with only new load: accepted, no metrics event.
        let mut next = advert(peer.node_id(), s.domain(), 2, T0 + 5);
        next.load.in_flight = 3;
        let verdict = s.handle(
            at(5),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: Signed::sign(next, &peer).unwrap().into(),
                certificate: None,
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        assert!(s.take().is_empty());
        let member = s.me.member(&peer.node_id()).unwrap();
        assert_eq!(member.advert().load.in_flight, 3);
        assert_eq!(member.last_heard(), at(5));
        assert_eq!(member.joined_at(), at(0));

        // A new price is an update.
        let mut next = advert(peer.node_id(), s.domain(), 3, T0 + 6);
        next.completion_price = 99;
        s.handle(
            at(6),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: Signed::sign(next, &peer).unwrap().into(),
                certificate: None,
            },
        );
        assert_eq!(
            s.take(),
            vec![Action::MemberUpdated {
                node: peer.node_id(),
                routable: true
            }]
        );
    }

    #[test]
    fn forged_and_misattributed_adverts_are_rejected_and_penalised() {
        let mut s = Setup::new(Admission::Open);
        let peer = key(2);
        let other = key(3);

        // Tampered payload: the signature no longer verifies.
        let mut tampered = s.signed_advert(&peer, 1, T0);
        tampered.payload.prompt_price += 1;
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: tampered.into(),
                certificate: None,
            },
        );
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(matches!(reason, Rejection::BadSignature { .. }), "{reason}");

        // Signed by another key than the node it describes.
        let mut stolen = s.signed_advert(&peer, 1, T0);
        let by_other = s.signed_advert(&other, 1, T0);
        stolen.signer = other.node_id();
        stolen.signature = by_other.signature;
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: other.node_id(),
                advert: stolen.into(),
                certificate: None,
            },
        );
        let reason = assert_rejected(&mut s, verdict, other.node_id());
        assert!(matches!(reason, Rejection::NotAuthor { .. }), "{reason}");

        // A forgery relayed by `other` blames `other`, the peer that delivered it.
        let mut forged = s.signed_advert(&peer, 1, T0);
        forged.payload.prompt_price += 1;
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: other.node_id(),
                advert: forged.into(),
                certificate: None,
            },
        );
        let reason = assert_rejected(&mut s, verdict, other.node_id());
        assert!(matches!(reason, Rejection::BadSignature { .. }), "{reason}");

        // For another domain.
        let foreign =
            Signed::sign(advert(peer.node_id(), DomainId([9; 32]), 1, T0), &peer).unwrap();
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: foreign.into(),
                certificate: None,
            },
        );
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(matches!(reason, Rejection::WrongDomain { .. }), "{reason}");

        // Statically invalid (non-finite load), with a signature made over it anyway.
        let mut invalid = s.signed_advert(&peer, 1, T0);
        invalid.payload.load.tokens_per_s = f32::NAN;
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: invalid.into(),
                certificate: None,
            },
        );
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(matches!(reason, Rejection::Invalid { .. }), "{reason}");

        assert!(s.me.is_empty());
    }

    #[test]
    fn clock_skew_is_rejected_and_old_adverts_ignored() {
        let mut s = Setup::new(Admission::Open);
        let peer = key(2);
        // Sent 301 s in our future.
        let ahead = s.signed_advert(&peer, 1, T0 + MAX_CLOCK_SKEW_SECS + 1);
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: ahead.into(),
                certificate: None,
            },
        );
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(reason.to_string().contains("ahead of this node's clock"));

        // Exactly at the limit is fine.
        let ahead = s.signed_advert(&peer, 1, T0 + MAX_CLOCK_SKEW_SECS);
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: ahead.into(),
                certificate: None,
            },
        );
        assert_eq!(verdict, Verdict::Accept);

        // A clock 5 minutes behind is tolerated ...
        let behind = s.signed_advert(&key(3), 1, T0);
        s.take();
        let verdict = s.handle(
            at(330),
            Event::AdvertReceived {
                from: key(3).node_id(),
                advert: behind.into(),
                certificate: None,
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        // ... and the member is timed from the advert's arrival, not its `sent_at`.
        assert_eq!(
            s.me.member(&key(3).node_id()).unwrap().last_heard(),
            at(330)
        );

        // Older than the silence window plus the skew (330 s): a replay, ignored, no penalty.
        let old = s.signed_advert(&key(4), 1, T0);
        s.take();
        let verdict = s.handle(
            at(331),
            Event::AdvertReceived {
                from: key(4).node_id(),
                advert: old.into(),
                certificate: None,
            },
        );
        assert!(matches!(verdict, Verdict::Ignore(Ignored::TooOld { .. })));
        assert!(s.take().is_empty());
    }

    #[test]
    fn stale_duplicate_and_equivocating_adverts() {
        let mut s = Setup::new(Admission::Open);
        let peer = key(2);
        assert_eq!(s.gossip(&peer, 5, 0, None), Verdict::Accept);
        s.take();
        // Older sequence number: reordered gossip, ignored without penalty.
        assert_eq!(
            s.gossip(&peer, 4, 1, None),
            Verdict::Ignore(Ignored::Stale { seq: 4, latest: 5 })
        );
        // The same message again.
        assert_eq!(
            s.gossip(&peer, 5, 0, None),
            Verdict::Ignore(Ignored::Duplicate)
        );
        assert!(s.take().is_empty());
        // The same number with other content: equivocation.
        let verdict = s.gossip(&peer, 5, 1, None);
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(matches!(reason, Rejection::Equivocation { seq: 5, .. }));
        assert_eq!(s.me.member(&peer.node_id()).unwrap().advert().sent_at, T0);

        // The equivocation again, relayed by an honest peer: dropped, the relay not blamed.
        let mut equivocation = s.signed_advert(&peer, 5, T0);
        equivocation.payload.prompt_price += 7;
        let equivocation = Signed::sign(equivocation.payload, &peer).unwrap();
        let verdict = s.handle(
            at(2),
            Event::AdvertReceived {
                from: key(3).node_id(),
                advert: equivocation.into(),
                certificate: None,
            },
        );
        assert!(
            matches!(&verdict, Verdict::Ignore(Ignored::NotUsable(why)) if why.contains("two different adverts")),
            "{verdict:?}"
        );
        assert!(s.take().is_empty());
        // A valid advert relayed by another peer is accepted like one from its node.
        let relayed = s.signed_advert(&key(4), 1, T0);
        let verdict = s.handle(
            at(2),
            Event::AdvertReceived {
                from: key(3).node_id(),
                advert: relayed.into(),
                certificate: None,
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        assert!(s.me.member(&key(4).node_id()).is_some());
    }

    #[test]
    fn certificates_gate_admission_in_allow_list_domains() {
        let peer = key(2);
        let mut s = Setup::new(Admission::AllowList(vec![peer.node_id()]));

        // No certificate.
        let verdict = s.gossip(&peer, 1, 0, None);
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(matches!(reason, Rejection::MissingCertificate { .. }));

        // A certificate for someone else.
        let wrong = s.cert(&key(3), 1);
        let verdict = s.gossip(&peer, 1, 0, Some(wrong));
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(reason.to_string().contains("it was issued to"), "{reason}");

        // A certificate not signed by the operator.
        let forged = Signed::sign(
            certificate(s.domain(), peer.node_id(), T0 - 100, 1),
            &key(50),
        )
        .unwrap();
        let verdict = s.gossip(&peer, 1, 0, Some(forged));
        assert!(matches!(
            assert_rejected(&mut s, verdict, peer.node_id()),
            Rejection::BadCertificate { .. }
        ));

        // An expired certificate.
        let expired = Signed::sign(
            certificate(s.domain(), peer.node_id(), T0 - 100_000, 1),
            &s.operator,
        )
        .unwrap();
        let verdict = s.gossip(&peer, 1, 0, Some(expired));
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(reason.to_string().contains("expired"), "{reason}");

        // A good one.
        let good = s.cert(&peer, 1);
        assert_eq!(s.gossip(&peer, 1, 0, Some(good.clone())), Verdict::Accept);
        assert_eq!(
            s.me.member(&peer.node_id()).unwrap().certificate(),
            Some(&good)
        );
        // Later adverts may omit it: the table keeps it.
        assert_eq!(s.gossip(&peer, 2, 1, None), Verdict::Accept);

        // A node outside the allow list, even with an operator certificate.
        let outsider = key(4);
        let cert = s.cert(&outsider, 9);
        let verdict = s.gossip(&outsider, 1, 0, Some(cert));
        assert!(matches!(
            assert_rejected(&mut s, verdict, outsider.node_id()),
            Rejection::NotAdmitted { .. }
        ));
    }

    #[test]
    fn deny_lists_apply_and_certificates_may_arrive_first() {
        let denied = key(3);
        let peer = key(2);
        let mut s = Setup::new(Admission::DenyList(vec![denied.node_id()]));
        let cert = s.cert(&denied, 1);
        let verdict = s.gossip(&denied, 1, 0, Some(cert));
        assert!(matches!(
            assert_rejected(&mut s, verdict, denied.node_id()),
            Rejection::NotAdmitted { .. }
        ));

        // The certificate alone first (e.g. from a snapshot or the operator), then the advert.
        let cert = s.cert(&peer, 1);
        let verdict = s.handle(
            at(0),
            Event::CertificateReceived {
                from: None,
                certificate: cert.clone(),
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        assert_eq!(s.gossip(&peer, 1, 0, None), Verdict::Accept);
        assert_eq!(
            s.me.member(&peer.node_id()).unwrap().certificate(),
            Some(&cert)
        );

        // A forged certificate is rejected.
        let forged = Signed::sign(
            certificate(s.domain(), key(5).node_id(), T0 - 100, 1),
            &key(5),
        )
        .unwrap();
        let verdict = s.handle(
            at(0),
            Event::CertificateReceived {
                from: Some(key(5).node_id()),
                certificate: forged,
            },
        );
        assert!(matches!(
            verdict,
            Verdict::Reject(Rejection::BadSignature { .. })
        ));
    }

    #[test]
    fn revocations_remove_members_and_block_their_certificates() {
        let peer = key(2);
        let mut s = Setup::new(Admission::DenyList(vec![]));
        let cert = s.cert(&peer, 7);
        assert_eq!(s.gossip(&peer, 1, 0, Some(cert.clone())), Verdict::Accept);
        s.take();

        let revocation = Revocation {
            domain: s.domain(),
            member: peer.node_id(),
            serial: 7,
            revoked_at: T0 + 1,
        };
        // Not by the operator: rejected.
        let forged = Signed::sign(revocation.clone(), &peer).unwrap();
        let verdict = s.handle(
            at(1),
            Event::RevocationReceived {
                from: Some(peer.node_id()),
                revocation: forged,
            },
        );
        assert_rejected(&mut s, verdict, peer.node_id());
        assert!(s.me.member(&peer.node_id()).is_some());

        let signed = Signed::sign(revocation, &s.operator).unwrap();
        let verdict = s.handle(
            at(1),
            Event::RevocationReceived {
                from: None,
                revocation: signed.clone(),
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        assert_eq!(
            s.take(),
            vec![Action::MemberLeft {
                node: peer.node_id(),
                reason: LeaveReason::Revoked
            }]
        );
        assert!(s.me.is_revoked(&peer.node_id(), 7));
        let verdict = s.handle(
            at(1),
            Event::RevocationReceived {
                from: None,
                revocation: signed,
            },
        );
        assert_eq!(verdict, Verdict::Ignore(Ignored::Duplicate));

        // The revoked certificate no longer admits it.
        let verdict = s.gossip(&peer, 2, 2, Some(cert));
        let reason = assert_rejected(&mut s, verdict, peer.node_id());
        assert!(reason.to_string().contains("revoked"), "{reason}");
        // A new certificate does.
        let renewed = s.cert(&peer, 8);
        assert_eq!(s.gossip(&peer, 3, 3, Some(renewed)), Verdict::Accept);
    }

    #[test]
    fn members_that_miss_the_requirements_are_visible_but_not_routable() {
        let mut s = Setup::new(Admission::Open);
        let peer = key(2);
        let mut wrong = advert(peer.node_id(), s.domain(), 1, T0);
        wrong.model_hash = ContentHash::of(b"another model");
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: Signed::sign(wrong, &peer).unwrap().into(),
                certificate: None,
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        assert_eq!(
            s.take(),
            vec![Action::MemberJoined {
                node: peer.node_id(),
                routable: false
            }]
        );
        let member = s.me.member(&peer.node_id()).unwrap();
        assert!(matches!(
            member.unroutable(),
            Some(Unroutable::ModelNotAccepted { .. })
        ));
        assert_eq!(s.me.candidates().count(), 0);

        // Missing the required knowledge base.
        let mut no_kb = advert(peer.node_id(), s.domain(), 2, T0 + 1);
        no_kb.kb_hash = None;
        s.handle(
            at(1),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: Signed::sign(no_kb, &peer).unwrap().into(),
                certificate: None,
            },
        );
        assert!(matches!(
            s.me.member(&peer.node_id()).unwrap().unroutable(),
            Some(Unroutable::WrongKnowledgeBase { got: None, .. })
        ));
        s.take();

        // Fixed: routable again, reported as an update.
        assert_eq!(s.gossip(&peer, 3, 2, None), Verdict::Accept);
        assert_eq!(
            s.take(),
            vec![Action::MemberUpdated {
                node: peer.node_id(),
                routable: true
            }]
        );
        assert_eq!(s.me.candidates().count(), 1);
    }

    #[test]
    fn silent_members_leave_after_three_heartbeats() {
        let mut s = Setup::new(Admission::Open);
        let (a, b) = (key(2), key(3));
        s.gossip(&a, 1, 0, None);
        s.gossip(&b, 1, 0, None);
        s.gossip(&b, 2, 20, None);
        s.take();
        assert_eq!(s.me.next_wakeup(), Some(at(30)));

        s.handle(Millis(at(30).0 - 1), Event::Tick);
        assert_eq!(s.me.len(), 2);
        assert!(s.take().is_empty());
        s.handle(at(30), Event::Tick);
        assert_eq!(
            s.take(),
            vec![Action::MemberLeft {
                node: a.node_id(),
                reason: LeaveReason::Silent
            }]
        );
        assert!(s.me.member(&b.node_id()).is_some());
        assert_eq!(s.me.next_wakeup(), Some(at(50)));
        s.handle(at(50), Event::Tick);
        assert!(s.me.is_empty());
        assert_eq!(s.me.next_wakeup(), None);
    }

    #[test]
    fn re_adverts_move_the_silence_wakeup_rarely_and_a_silent_member_leaves_on_time() {
        let mut s = Setup::new(Admission::Open);
        let a = key(2);
        s.gossip(&a, 1, 0, None);
        // The member re-advertises every 10 s for 300 s; the caller ticks whenever asked.
        let mut ticks = 0;
        for step in 1..=30 {
            let advert_at = at(step * 10);
            while let Some(wake) = s.me.next_wakeup().filter(|w| *w < advert_at) {
                s.handle(wake, Event::Tick);
                ticks += 1;
            }
            s.gossip(&a, step + 1, step * 10, None);
        }
        assert!(
            s.take()
                .iter()
                .all(|a| !matches!(a, Action::MemberLeft { .. }))
        );
        // A re-advert does not move the wakeup: the tick that finds it early re-files the
        // member, at most four times per silence window (30 s here).
        assert!((1..=4 * 300 / 30).contains(&ticks), "{ticks} ticks");
        // Silent from 300 s: it leaves three heartbeats later, not earlier.
        let mut left = None;
        while let Some(wake) = s.me.next_wakeup() {
            s.handle(wake, Event::Tick);
            if !s.take().is_empty() {
                left = Some(wake);
                break;
            }
        }
        assert_eq!(left, Some(at(330)));
        assert!(s.me.is_empty());
    }

    #[test]
    fn a_large_domain_stretches_heartbeats_and_silence_within_its_advert_budget() {
        // A budget of one advert per second: with 19 members and this node, each publishes
        // every 13.3 to 26.7 s (20 s on average) instead of 10, and a member is silent after
        // three of the longest intervals, 80 s, instead of 30.
        let config = Config {
            max_adverts_per_s: 1,
            ..Config::default()
        };
        let mut s = Setup::with_config(Admission::Open, config);
        assert_eq!(s.me.heartbeat_ms(), 10_000);
        let keys: Vec<SecretKey> = (2..21).map(key).collect();
        for k in &keys {
            s.gossip(k, 1, 0, None);
        }
        assert_eq!(s.me.len(), 19);
        assert_eq!(s.me.heartbeat_ms(), 26_666);
        assert_eq!(s.me.silence_ms(), 79_998);
        assert_eq!(s.me.next_wakeup(), Some(at(0).plus(79_998)));
        // This node publishes, and next after a half to a whole interval.
        s.handle(at(1), Event::LocalAdvertChanged(Some(service())));
        assert!(s.take().iter().any(|a| matches!(a, Action::Publish(_))));
        let next = s.me.next_wakeup().unwrap();
        assert!(
            next >= at(1).plus(13_333) && next <= at(1).plus(26_666),
            "{next}"
        );
        s.handle(at(79), Event::Tick);
        assert_eq!(s.me.len(), 19);
        s.handle(at(80), Event::Tick);
        assert!(s.me.is_empty());
        // Back to a small table: the plain heartbeat.
        assert_eq!(s.me.heartbeat_ms(), 10_000);
    }

    #[test]
    fn a_leaving_advert_removes_at_once_and_late_adverts_do_not_resurrect() {
        let mut s = Setup::new(Admission::Open);
        let peer = key(2);
        s.gossip(&peer, 1, 0, None);
        s.take();
        let mut bye = advert(peer.node_id(), s.domain(), 3, T0 + 1);
        bye.leaving = true;
        let verdict = s.handle(
            at(1),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: Signed::sign(bye, &peer).unwrap().into(),
                certificate: None,
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        assert_eq!(
            s.take(),
            vec![Action::MemberLeft {
                node: peer.node_id(),
                reason: LeaveReason::Left
            }]
        );
        // seq 2 was sent before the goodbye and arrives late.
        assert_eq!(
            s.gossip(&peer, 2, 2, None),
            Verdict::Ignore(Ignored::Departed)
        );
        // Coming back later with a new advert works.
        assert_eq!(s.gossip(&peer, 4, 3, None), Verdict::Accept);
    }

    /// A departed member's last advert, replayed after the silence window but within the
    /// acceptance window (silence plus clock skew), must not bring it back: the tombstone
    /// lives as long as an advert it blocks could be accepted. (With tombstones kept only for
    /// the silence window, the replay at 100 s resurrected the member.)
    #[test]
    fn tombstones_outlive_the_acceptance_window() {
        let mut s = Setup::new(Admission::Open);
        let (left, crashed) = (key(2), key(3));
        let last_of_left = s.signed_advert(&left, 1, T0);
        s.gossip(&left, 1, 0, None);
        let last_of_crashed = s.signed_advert(&crashed, 1, T0);
        s.gossip(&crashed, 1, 0, None);
        let mut bye = advert(left.node_id(), s.domain(), 2, T0 + 1);
        bye.leaving = true;
        s.handle(
            at(1),
            Event::AdvertReceived {
                from: left.node_id(),
                advert: Signed::sign(bye, &left).unwrap().into(),
                certificate: None,
            },
        );
        // The crashed member goes silent and leaves after three heartbeats (30 s).
        s.handle(at(30), Event::Tick);
        assert!(s.me.is_empty());
        // Ticks keep running; at 100 s both last adverts are replayed by a relay.
        for t in (40..=100).step_by(10) {
            s.handle(at(t), Event::Tick);
        }
        s.take();
        for (node, advert) in [(&left, last_of_left), (&crashed, last_of_crashed)] {
            let verdict = s.handle(
                at(100),
                Event::AdvertReceived {
                    from: key(9).node_id(),
                    advert: advert.into(),
                    certificate: None,
                },
            );
            assert_eq!(
                verdict,
                Verdict::Ignore(Ignored::Departed),
                "{}",
                node.node_id()
            );
        }
        assert!(s.me.is_empty(), "a replayed advert brought a member back");
        // A fresh advert from the crashed node (it restarted) is welcome.
        assert_eq!(s.gossip(&crashed, 5, 110, None), Verdict::Accept);
    }

    /// Gossip delivering an advert older than the acceptance window plus the clock skew is a
    /// replay: the deliverer is penalised, whoever signed the advert. Between the window and
    /// that limit it is only ignored (a late relay, a slow clock).
    #[test]
    fn replayed_adverts_penalise_their_deliverer() {
        let mut s = Setup::new(Admission::Open);
        let signer = key(2);
        let relay = key(9).node_id();
        let old = s.signed_advert(&signer, 1, T0);
        let window = s.me.config.max_advert_age_ms() / 1000;
        let late = s.handle(
            at(window + 1),
            Event::AdvertReceived {
                from: relay,
                advert: old.clone().into(),
                certificate: None,
            },
        );
        assert!(
            matches!(late, Verdict::Ignore(Ignored::TooOld { .. })),
            "{late:?}"
        );
        assert!(s.take().is_empty());
        let replayed = s.handle(
            at(window + MAX_CLOCK_SKEW_SECS + 1),
            Event::AdvertReceived {
                from: relay,
                advert: old.clone().into(),
                certificate: None,
            },
        );
        let reason = assert_rejected(&mut s, replayed, relay);
        assert!(matches!(reason, Rejection::Replayed { .. }), "{reason}");
        assert!(s.me.is_empty());
    }

    /// An open domain flooded with self-made identities: the table keeps its lowest-ranked
    /// members and those that served this node, so an honest newcomer gets in exactly when it
    /// ranks below the highest-ranked member that never served; more identities cannot evict a
    /// member that served, and re-advertising changes nothing.
    #[test]
    fn a_full_table_keeps_its_lowest_ranked_sample_and_members_that_serve() {
        let config = Config {
            max_members: 8,
            ..Config::default()
        };
        let mut s = Setup::with_config(Admission::Open, config);
        let honest = key(2);
        assert_eq!(s.gossip(&honest, 1, 0, None), Verdict::Accept);
        s.handle(at(0), Event::Served(honest.node_id()));
        let sybils: Vec<SecretKey> = (0..60).map(many_key).collect();
        for sybil in &sybils[..30] {
            s.gossip(sybil, 1, 1, None);
        }
        assert_eq!(s.me.len(), 8);
        let mut ranked: Vec<NodeId> = sybils[..30].iter().map(SecretKey::node_id).collect();
        ranked.sort_by_key(|n| s.me.rank(n));
        let mut expected: Vec<NodeId> = ranked[..7].to_vec();
        expected.push(honest.node_id());
        expected.sort();
        let mut held: Vec<NodeId> = s.me.members().map(Member::node).collect();
        held.sort();
        assert_eq!(held, expected);
        s.me.assert_indexes();

        // A newcomer above the highest-ranked sybil held stays out (its advert is still valid),
        // one below gets in at that sybil's cost.
        let highest = s.me.rank(&ranked[6]);
        let newcomers: Vec<SecretKey> = (1000..1200).map(many_key).collect();
        let low = newcomers
            .iter()
            .find(|k| s.me.rank(&k.node_id()) < highest)
            .expect("a key ranks low");
        let high = newcomers
            .iter()
            .find(|k| s.me.rank(&k.node_id()) > highest)
            .expect("a key ranks high");
        assert!(s.me.would_keep(&low.node_id()));
        assert!(!s.me.would_keep(&high.node_id()));
        assert_eq!(
            s.gossip(high, 1, 2, None),
            Verdict::Ignore(Ignored::TableFull { limit: 8 })
        );
        assert!(s.me.member(&high.node_id()).is_none());
        s.take();
        assert_eq!(s.gossip(low, 1, 2, None), Verdict::Accept);
        assert!(s.me.member(&low.node_id()).is_some());
        assert!(s.take().contains(&Action::MemberLeft {
            node: ranked[6],
            reason: LeaveReason::Evicted
        }));
        s.handle(at(2), Event::Served(low.node_id()));

        // Thirty more identities and the held ones re-advertising: the members that served
        // stay, the table keeps its lowest-ranked sample.
        for sybil in &sybils[30..] {
            s.gossip(sybil, 1, 3, None);
        }
        for sybil in &sybils {
            s.gossip(sybil, 2, 4, None);
        }
        assert!(s.me.member(&honest.node_id()).is_some());
        assert!(s.me.member(&low.node_id()).is_some());
        assert_eq!(s.me.len(), 8);
        let mut all: Vec<NodeId> = sybils.iter().map(SecretKey::node_id).collect();
        all.sort_by_key(|n| s.me.rank(n));
        let mut expected: Vec<NodeId> = all[..6].to_vec();
        expected.extend([honest.node_id(), low.node_id()]);
        expected.sort();
        let mut held: Vec<NodeId> = s.me.members().map(Member::node).collect();
        held.sort();
        assert_eq!(held, expected);
        s.me.assert_indexes();
    }

    /// A node that published into a domain it thought small moves its next heartbeat later
    /// once its full table shows the domain is far larger than the table, and never delays a
    /// publish that a change of its offer asked for; with room in its table it keeps the
    /// plain first heartbeat.
    #[test]
    fn the_first_heartbeat_moves_later_when_the_domain_outgrows_the_table() {
        for (max_members, moves) in [(100, true), (10_000, false)] {
            let config = Config {
                max_members,
                ..Config::default()
            };
            let mut s = Setup::with_config(Admission::Open, config);
            s.handle(at(0), Event::LocalAdvertChanged(Some(service())));
            assert_eq!(published(&s.take()).len(), 1);
            let planned = s.me.next_wakeup().unwrap();
            assert!(planned <= at(10), "{planned}");
            // 2 000 members appear within the second (a cold start).
            for i in 0..2000 {
                s.gossip(&many_key(i), 1, 1, None);
            }
            s.take();
            let heartbeat = s.me.heartbeat_ms();
            assert!(heartbeat > 60_000, "{heartbeat}");
            let next = s.me.next_wakeup().unwrap();
            if !moves {
                assert_eq!(next, planned);
                continue;
            }
            assert!(
                next >= at(0).plus(heartbeat / 2) && next <= at(0).plus(heartbeat),
                "{next} for a heartbeat of {heartbeat} ms"
            );
            // Nothing is published at the old time.
            s.handle(planned, Event::Tick);
            assert!(published(&s.take()).is_empty());
            // A change of offer still goes out after the minimum interval.
            let mut changed = service();
            changed.model_name = "another-model".into();
            s.handle(at(2), Event::LocalAdvertChanged(Some(changed)));
            assert_eq!(published(&s.take()).len(), 1);
        }
    }

    /// A node whose table holds a sample of a larger domain estimates the domain's size from
    /// its sample's ranks, and stretches its heartbeat to the domain's advert budget as if it
    /// held everyone.
    #[test]
    fn a_sample_estimates_the_domain_size_and_the_heartbeat_follows_it() {
        let config = Config {
            max_members: 100,
            ..Config::default()
        };
        let mut s = Setup::with_config(Admission::Open, config.clone());
        for i in 0..2000 {
            s.gossip(&many_key(i), 1, 0, None);
        }
        assert_eq!(s.me.len(), 100);
        s.me.assert_indexes();
        let estimate = s.me.domain_size_estimate();
        assert!((1400..=2800).contains(&estimate), "{estimate}");
        let budget = u64::from(config.max_adverts_per_s);
        assert_eq!(s.me.heartbeat_ms(), estimate * 4000 / (3 * budget));
        // A table with room counts what it holds.
        let mut small = Setup::with_config(Admission::Open, Config::default());
        for i in 0..50 {
            small.gossip(&many_key(i), 1, 0, None);
        }
        assert_eq!(small.me.domain_size_estimate(), 51);
    }

    #[test]
    fn the_table_is_bounded_and_prefers_routable_members() {
        let config = Config {
            max_members: 3,
            ..Config::default()
        };
        let mut s = Setup::with_config(Admission::Open, config);
        // Two routable members and one that is not.
        s.gossip(&key(2), 1, 0, None);
        s.gossip(&key(3), 1, 0, None);
        let unfit = key(4);
        let mut wrong = advert(unfit.node_id(), s.domain(), 1, T0);
        wrong.prompt_hash = Some(ContentHash::of(b"p"));
        wrong.model_hash = ContentHash::of(b"nope");
        s.handle(
            at(0),
            Event::AdvertReceived {
                from: unfit.node_id(),
                advert: Signed::sign(wrong.clone(), &unfit).unwrap().into(),
                certificate: None,
            },
        );
        assert_eq!(s.me.len(), 3);
        s.take();

        // A fourth routable node evicts the unroutable one.
        assert_eq!(s.gossip(&key(5), 1, 0, None), Verdict::Accept);
        assert_eq!(
            s.take(),
            vec![
                Action::MemberLeft {
                    node: unfit.node_id(),
                    reason: LeaveReason::Evicted
                },
                Action::MemberJoined {
                    node: key(5).node_id(),
                    routable: true
                }
            ]
        );
        // A fifth finds the table full of routable members that served this node.
        for member in [key(2), key(3), key(5)] {
            s.handle(at(0), Event::Served(member.node_id()));
        }
        assert_eq!(
            s.gossip(&key(6), 1, 0, None),
            Verdict::Ignore(Ignored::TableFull { limit: 3 })
        );
        // So does an unroutable one.
        wrong.seq = 2;
        let verdict = s.handle(
            at(0),
            Event::AdvertReceived {
                from: unfit.node_id(),
                advert: Signed::sign(wrong, &unfit).unwrap().into(),
                certificate: None,
            },
        );
        assert!(matches!(
            verdict,
            Verdict::Ignore(Ignored::TableFull { .. })
        ));
        assert_eq!(s.me.len(), 3);
        // Known members still update.
        assert_eq!(s.gossip(&key(2), 2, 1, None), Verdict::Accept);
    }

    #[test]
    fn pending_certificates_and_revocations_are_bounded() {
        let config = Config {
            max_pending_certificates: 2,
            max_revocations: 2,
            ..Config::default()
        };
        let mut s = Setup::with_config(Admission::DenyList(vec![]), config);
        for i in 2..=5 {
            let cert = s.cert(&key(i), 1);
            s.handle(
                at(0),
                Event::CertificateReceived {
                    from: None,
                    certificate: cert,
                },
            );
        }
        assert_eq!(s.me.pending_certificates.len(), 2);
        // The oldest were forgotten: key(2) now needs its certificate again.
        assert!(matches!(
            s.gossip(&key(2), 1, 0, None),
            Verdict::Reject(Rejection::MissingCertificate { .. })
        ));
        assert_eq!(s.gossip(&key(5), 1, 0, None), Verdict::Accept);

        for serial in 0..4 {
            let rev = Revocation {
                domain: s.domain(),
                member: key(9).node_id(),
                serial,
                revoked_at: T0 + serial,
            };
            let signed = Signed::sign(rev, &s.operator).unwrap();
            s.handle(
                at(0),
                Event::RevocationReceived {
                    from: None,
                    revocation: signed,
                },
            );
        }
        assert_eq!(s.me.revocations.len(), 2);
        assert!(!s.me.is_revoked(&key(9).node_id(), 0));
        assert!(s.me.is_revoked(&key(9).node_id(), 3));
    }

    #[test]
    fn fifo_map_stays_compact_under_churn() {
        let mut map = FifoMap::new(4);
        for i in 0..1_000u32 {
            let id = many_key(i).node_id();
            map.insert(id, i);
            map.remove(&id);
        }
        assert_eq!(map.len(), 0);
        assert!(map.order.len() <= 8);
    }

    #[test]
    fn heartbeats_are_scheduled_with_seeded_jitter() {
        let mut s = Setup::new(Admission::Open);
        assert_eq!(s.me.local_status(), &LocalStatus::Idle);
        assert_eq!(s.me.next_wakeup(), None);
        s.handle(at(0), Event::LocalAdvertChanged(Some(service())));
        let actions = s.take();
        assert!(actions.contains(&Action::LocalStatusChanged(LocalStatus::Serving)));
        let first = published(&actions);
        assert_eq!(first.len(), 1);
        let first = first[0].clone();
        let advert = first.advert.verify().unwrap();
        assert_eq!(advert.node, key(1).node_id());
        assert_eq!(advert.seq, at(0).0);
        assert_eq!(advert.sent_at, T0);
        assert!(first.certificate.is_none());
        // This node is a routing candidate too.
        assert_eq!(
            s.me.candidates().map(|c| c.node).collect::<Vec<_>>(),
            vec![key(1).node_id()]
        );

        // Walk the clock: each heartbeat comes 9–10 s after the previous one.
        let mut last = at(0);
        let mut seq = advert.seq;
        let mut gaps = Vec::new();
        for _ in 0..50 {
            let wake = s.me.next_wakeup().unwrap();
            assert!(s.take().is_empty());
            s.handle(Millis(wake.0 - 1), Event::Tick);
            assert!(published(&s.take()).is_empty(), "published early");
            s.handle(wake, Event::Tick);
            let actions = s.take();
            let entries = published(&actions);
            assert_eq!(entries.len(), 1);
            let advert = &entries[0].advert.payload;
            assert!(advert.seq > seq);
            seq = advert.seq;
            let gap = wake.since(last);
            assert!((9_000..=10_000).contains(&gap), "gap {gap}");
            gaps.push(gap);
            last = wake;
        }
        // Jittered, not constant.
        assert!(gaps.iter().any(|&g| g != gaps[0]));

        // The same seed gives the same schedule.
        let mut again = Setup::new(Admission::Open);
        again.handle(at(0), Event::LocalAdvertChanged(Some(service())));
        let mut replay = Vec::new();
        let mut last = at(0);
        for _ in 0..50 {
            let wake = again.me.next_wakeup().unwrap();
            again.handle(wake, Event::Tick);
            replay.push(wake.since(last));
            last = wake;
        }
        assert_eq!(gaps, replay);
    }

    #[test]
    fn changes_publish_at_once_but_load_waits_for_the_heartbeat() {
        let mut s = Setup::new(Admission::Open);
        s.handle(at(0), Event::LocalAdvertChanged(Some(service())));
        s.take();
        let heartbeat = s.me.next_wakeup().unwrap();

        // Load alone: nothing now, the heartbeat carries it.
        let mut busy = service();
        busy.load.in_flight = 4;
        s.handle(
            at(0).plus(300),
            Event::LocalAdvertChanged(Some(busy.clone())),
        );
        assert!(s.take().is_empty());
        assert_eq!(s.me.next_wakeup(), Some(heartbeat));

        // A new price 500 ms after the last publication waits for the minimum interval ...
        busy.price = Price::flat(20);
        s.handle(
            at(0).plus(500),
            Event::LocalAdvertChanged(Some(busy.clone())),
        );
        assert!(published(&s.take()).is_empty());
        assert_eq!(s.me.next_wakeup(), Some(at(1)));
        s.handle(at(1), Event::Tick);
        let actions = s.take();
        let entries = published(&actions);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].advert.payload.price(), Price::flat(20));
        assert_eq!(entries[0].advert.payload.load.in_flight, 4);

        // ... and one later than that goes out at once.
        busy.price = Price::flat(30);
        s.handle(at(5), Event::LocalAdvertChanged(Some(busy)));
        assert_eq!(published(&s.take()).len(), 1);
    }

    #[test]
    fn stopping_publishes_a_leaving_advert_that_peers_honour() {
        let mut s = Setup::new(Admission::Open);
        let mut peer =
            Membership::new(Config::default(), s.me.signed_manifest().clone(), key(2), 1).unwrap();
        let mut peer_actions = Vec::new();
        s.handle(at(0), Event::LocalAdvertChanged(Some(service())));
        let actions = s.take();
        let hello = published(&actions)[0].clone();
        let verdict = peer.handle(
            at(0),
            Event::AdvertReceived {
                from: key(1).node_id(),
                advert: hello.advert,
                certificate: hello.certificate,
            },
            &mut peer_actions,
        );
        assert_eq!(verdict, Verdict::Accept);
        assert_eq!(peer.len(), 1);

        s.handle(at(3), Event::LocalAdvertChanged(None));
        let actions = s.take();
        assert!(actions.contains(&Action::LocalStatusChanged(LocalStatus::Idle)));
        let bye = published(&actions)[0].clone();
        assert!(bye.advert.payload.leaving);
        assert_eq!(s.me.next_wakeup(), None);
        assert_eq!(s.me.candidates().count(), 0);
        let verdict = peer.handle(
            at(3),
            Event::AdvertReceived {
                from: key(1).node_id(),
                advert: bye.advert,
                certificate: bye.certificate,
            },
            &mut peer_actions,
        );
        assert_eq!(verdict, Verdict::Accept);
        assert!(peer.is_empty());
        // Stopping twice publishes nothing more.
        s.handle(at(4), Event::LocalAdvertChanged(None));
        assert!(s.take().is_empty());
    }

    #[test]
    fn a_node_without_certificate_waits_for_one_before_publishing() {
        let mut s = Setup::new(Admission::AllowList(vec![key(1).node_id()]));
        s.handle(at(0), Event::LocalAdvertChanged(Some(service())));
        assert_eq!(
            s.take(),
            vec![Action::LocalStatusChanged(LocalStatus::Blocked(
                LocalIssue::NoCertificate
            ))]
        );
        assert!(
            LocalIssue::NoCertificate
                .to_string()
                .contains("ask the domain's operator")
        );
        // Heartbeats keep failing quietly.
        let wake = s.me.next_wakeup().unwrap();
        s.handle(wake, Event::Tick);
        assert!(s.take().is_empty());

        let mine = s.cert(&key(1), 3);
        let verdict = s.handle(
            wake,
            Event::CertificateReceived {
                from: None,
                certificate: mine.clone(),
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        let actions = s.take();
        assert!(actions.contains(&Action::LocalStatusChanged(LocalStatus::Serving)));
        let entry = published(&actions)[0].clone();
        assert_eq!(entry.certificate, Some(mine.into()));
        assert_eq!(s.me.local_entry(), Some(entry));

        // Revoked: blocked again.
        let rev = Signed::sign(
            Revocation {
                domain: s.domain(),
                member: key(1).node_id(),
                serial: 3,
                revoked_at: T0,
            },
            &s.operator,
        )
        .unwrap();
        s.handle(
            wake,
            Event::RevocationReceived {
                from: None,
                revocation: rev,
            },
        );
        assert!(matches!(s.me.local_status(), LocalStatus::Blocked(_)));
        assert!(s.me.local_entry().is_none());
    }

    #[test]
    fn an_advert_that_misses_requirements_is_published_but_reported() {
        let mut s = Setup::new(Admission::Open);
        let mut other_model = service();
        other_model.model_hash = ContentHash::of(b"other");
        s.handle(at(0), Event::LocalAdvertChanged(Some(other_model)));
        let actions = s.take();
        assert_eq!(published(&actions).len(), 1);
        assert!(matches!(
            s.me.local_status(),
            LocalStatus::NotRoutable(Unroutable::ModelNotAccepted { .. })
        ));
        assert_eq!(s.me.candidates().count(), 0);

        // An advert the protocol refuses to sign.
        let mut empty = service();
        empty.model_name.clear();
        s.handle(at(5), Event::LocalAdvertChanged(Some(empty)));
        let status = s.me.local_status().clone();
        let LocalStatus::Blocked(LocalIssue::InvalidAdvert(reason)) = status else {
            panic!("{status:?}");
        };
        assert!(reason.contains("model_name"), "{reason}");
    }

    #[test]
    fn snapshots_are_verified_and_followed_page_by_page() {
        // A bootstrap peer that knows 40 members.
        let mut bootstrap = Setup::new(Admission::Open);
        for i in 0..40 {
            let node = many_key(i);
            let advert = bootstrap.signed_advert(&node, 1, T0);
            bootstrap.handle(
                at(0),
                Event::AdvertReceived {
                    from: node.node_id(),
                    advert: advert.into(),
                    certificate: None,
                },
            );
        }
        assert_eq!(bootstrap.me.len(), 40);
        let server = bootstrap.me.local_node();

        let mut joiner = Membership::new(
            Config::default(),
            bootstrap.me.signed_manifest().clone(),
            key(9),
            2,
        )
        .unwrap();
        let mut actions = Vec::new();
        // Serve pages of at most 16 (as a smaller frame would).
        let page = |after: Option<NodeId>| {
            let ControlResponse::Members {
                domain,
                mut members,
                ..
            } = bootstrap.me.member_page(after).unwrap()
            else {
                panic!("not a member page");
            };
            let next = (members.len() > 16).then(|| members[15].node());
            members.truncate(16);
            (domain, members, next)
        };
        let mut after = None;
        let mut pages = 0;
        loop {
            let (domain, members, next) = page(after);
            pages += 1;
            let verdict = joiner.handle(
                at(5),
                Event::SnapshotReceived {
                    from: server,
                    domain,
                    members,
                    next,
                },
                &mut actions,
            );
            assert_eq!(verdict, Verdict::Accept);
            match actions.pop() {
                Some(Action::RequestSnapshot { peer, after: a }) => {
                    assert_eq!(peer, server);
                    assert_eq!(a, next);
                    after = a;
                }
                _ => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(joiner.len(), 40);
        // Members heard of through a snapshot age from their advert's time.
        let member = joiner.members().next().unwrap();
        assert_eq!(member.last_heard(), at(0));

        // A page that does not move forward ends the walk.
        let (domain, members, _) = page(None);
        actions.clear();
        joiner.handle(
            at(6),
            Event::SnapshotReceived {
                from: server,
                domain,
                members,
                next: Some(NodeId([0; 20])),
            },
            &mut actions,
        );
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::RequestSnapshot { .. })),
            "{actions:?}"
        );

        // A forged entry gets the relay penalised.
        let mut forged = bootstrap.me.members().next().unwrap().entry();
        let mut advert = SharedAdvert::unwrap_or_clone(forged.advert);
        advert.payload.prompt_price = 12345;
        advert.payload.seq = 99;
        forged.advert = SharedAdvert::new(advert);
        actions.clear();
        let verdict = joiner.handle(
            at(6),
            Event::SnapshotReceived {
                from: server,
                domain: joiner.domain(),
                members: vec![forged],
                next: None,
            },
            &mut actions,
        );
        assert!(matches!(
            verdict,
            Verdict::Reject(Rejection::BadSignature { .. })
        ));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Penalise { peer, .. } if *peer == server))
        );
        // A page for another domain.
        let verdict = joiner.handle(
            at(6),
            Event::SnapshotReceived {
                from: server,
                domain: DomainId([1; 32]),
                members: vec![],
                next: None,
            },
            &mut actions,
        );
        assert!(matches!(
            verdict,
            Verdict::Reject(Rejection::WrongDomain { .. })
        ));
    }

    #[test]
    fn member_pages_walk_a_large_table_once() {
        let mut s = Setup::new(Admission::Open);
        s.handle(at(0), Event::LocalAdvertChanged(Some(service())));
        let n = MAX_MEMBERS_PER_PAGE as u32 + 6;
        for i in 0..n {
            let node = many_key(i);
            let advert = s.signed_advert(&node, 1, T0);
            let verdict = s.handle(
                at(0),
                Event::AdvertReceived {
                    from: node.node_id(),
                    advert: advert.into(),
                    certificate: None,
                },
            );
            assert_eq!(verdict, Verdict::Accept);
        }
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let ControlResponse::Members { members, next, .. } = s.me.member_page(after).unwrap()
            else {
                panic!("not a member page");
            };
            pages += 1;
            seen.extend(members.iter().map(MemberEntry::node));
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 2);
        let mut expected: Vec<NodeId> = s.me.members().map(Member::node).collect();
        expected.push(s.me.local_node());
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn snapshot_entries_keep_a_heartbeat_of_grace() {
        let mut s = Setup::new(Admission::Open);
        let peer = key(2);
        let entry = MemberEntry {
            advert: s.signed_advert(&peer, 1, T0).into(),
            certificate: None,
        };
        let verdict = s.handle(
            at(28),
            Event::SnapshotReceived {
                from: key(3).node_id(),
                domain: s.domain(),
                members: vec![entry],
                next: None,
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        // 28 s old, but dated 20 s back at most: silent only after one more heartbeat.
        assert_eq!(s.me.member(&peer.node_id()).unwrap().last_heard(), at(8));
        assert_eq!(s.me.next_wakeup(), Some(at(38)));
    }

    #[test]
    fn a_newer_manifest_replaces_the_old_and_rechecks_members() {
        let mut s = Setup::new(Admission::Open);
        let (a, b) = (key(2), key(3));
        s.gossip(&a, 1, 0, None);
        s.gossip(&b, 1, 0, None);
        s.take();

        let mut v2 = manifest(&s.operator, Admission::DenyList(vec![a.node_id()]));
        v2.version = 2;
        v2.requirements.kb_hash = None;
        v2.requirements.prompt_hash = Some(ContentHash::of(b"prompt"));
        // Forged by someone else.
        let forged = Signed {
            payload: v2.clone(),
            signer: s.operator.node_id(),
            signature: Signed::sign(manifest(&key(7), Admission::Open), &key(7))
                .unwrap()
                .signature,
        };
        let verdict = s.handle(
            at(1),
            Event::ManifestReceived {
                from: Some(b.node_id()),
                manifest: forged,
            },
        );
        assert_rejected(&mut s, verdict, b.node_id());

        let signed = Signed::sign(v2, &s.operator).unwrap();
        let verdict = s.handle(
            at(1),
            Event::ManifestReceived {
                from: None,
                manifest: signed.clone(),
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        let actions = s.take();
        assert!(actions.contains(&Action::ManifestUpdated { version: 2 }));
        // `a` is denied now; `b` has no certificate, which a deny-list domain requires.
        assert!(actions.contains(&Action::MemberLeft {
            node: a.node_id(),
            reason: LeaveReason::NotAdmitted
        }));
        assert!(s.me.is_empty());
        assert_eq!(s.me.manifest().version, 2);

        // The same or an older version is ignored.
        let verdict = s.handle(
            at(1),
            Event::ManifestReceived {
                from: None,
                manifest: signed,
            },
        );
        assert_eq!(verdict, Verdict::Ignore(Ignored::Duplicate));
        let old = Signed::sign(manifest(&s.operator, Admission::Open), &s.operator).unwrap();
        let verdict = s.handle(
            at(1),
            Event::ManifestReceived {
                from: None,
                manifest: old,
            },
        );
        assert_eq!(
            verdict,
            Verdict::Ignore(Ignored::OldManifest {
                version: 1,
                current: 2
            })
        );
    }

    #[test]
    fn requirement_changes_in_a_new_manifest_update_routability() {
        let mut s = Setup::new(Admission::Open);
        let a = key(2);
        s.gossip(&a, 1, 0, None);
        s.take();
        let mut v2 = manifest(&s.operator, Admission::Open);
        v2.version = 2;
        v2.requirements.accepted_model_hashes = vec![ContentHash::of(b"new model")];
        s.handle(
            at(1),
            Event::ManifestReceived {
                from: None,
                manifest: Signed::sign(v2, &s.operator).unwrap(),
            },
        );
        let actions = s.take();
        assert!(actions.contains(&Action::MemberUpdated {
            node: a.node_id(),
            routable: false
        }));
        assert_eq!(s.me.candidates().count(), 0);
    }

    #[test]
    fn certificates_expire_at_ticks() {
        let peer = key(2);
        let mut s = Setup::new(Admission::DenyList(vec![]));
        let cert = s.cert(&peer, 1);
        let expires = Millis::from_secs(cert.payload.expires_at);
        // Keep the member heard of until just before expiry.
        let t = expires.0 - 20_000;
        let signed = Signed::sign(advert(peer.node_id(), s.domain(), 1, t / 1000), &peer).unwrap();
        let verdict = s.handle(
            Millis(t),
            Event::AdvertReceived {
                from: peer.node_id(),
                advert: signed.into(),
                certificate: Some(cert.into()),
            },
        );
        assert_eq!(verdict, Verdict::Accept);
        s.take();
        assert_eq!(s.me.next_wakeup(), Some(expires));
        s.handle(expires, Event::Tick);
        assert_eq!(
            s.take(),
            vec![Action::MemberLeft {
                node: peer.node_id(),
                reason: LeaveReason::CertificateExpired
            }]
        );
    }

    #[test]
    fn twenty_nodes_converge_deterministically() {
        // A tiny gossip simulation: every publication reaches every other node.
        let run = |seed: u64| {
            let operator = key(100);
            let signed = Signed::sign(manifest(&operator, Admission::Open), &operator).unwrap();
            let mut nodes: Vec<Membership> = (0..20)
                .map(|i| {
                    Membership::new(
                        Config::default(),
                        signed.clone(),
                        many_key(i),
                        seed + u64::from(i),
                    )
                    .unwrap()
                })
                .collect();
            let mut log = Vec::new();
            let mut now = at(0);
            let mut outbox = Vec::new();
            for (i, node) in nodes.iter_mut().enumerate() {
                let mut actions = Vec::new();
                node.handle(
                    now,
                    Event::LocalAdvertChanged(Some(service())),
                    &mut actions,
                );
                outbox.extend(actions.into_iter().map(|a| (i, a)));
            }
            for _ in 0..200 {
                for (from, action) in std::mem::take(&mut outbox) {
                    if let Action::Publish(entry) = action {
                        for (j, node) in nodes.iter_mut().enumerate() {
                            if j != from {
                                let mut actions = Vec::new();
                                let verdict = node.handle(
                                    now,
                                    Event::AdvertReceived {
                                        from: entry.node(),
                                        advert: entry.advert.clone(),
                                        certificate: entry.certificate.clone(),
                                    },
                                    &mut actions,
                                );
                                assert_eq!(verdict, Verdict::Accept);
                            }
                        }
                    }
                }
                let wake = nodes
                    .iter()
                    .filter_map(Membership::next_wakeup)
                    .min()
                    .unwrap();
                now = wake;
                log.push(now);
                for (i, node) in nodes.iter_mut().enumerate() {
                    let mut actions = Vec::new();
                    node.handle(now, Event::Tick, &mut actions);
                    outbox.extend(actions.into_iter().map(|a| (i, a)));
                }
            }
            for node in &nodes {
                node.assert_indexes();
                assert_eq!(node.len(), 19);
                assert_eq!(node.candidates().count(), 20);
            }
            log
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
    }

    #[test]
    fn bad_construction_is_refused() {
        let operator = key(100);
        let manifest = manifest(&operator, Admission::Open);
        let mut tampered = Signed::sign(manifest.clone(), &operator).unwrap();
        tampered.payload.version = 9;
        let err = Membership::new(Config::default(), tampered, key(1), 1).unwrap_err();
        assert!(err.to_string().contains("not validly signed"), "{err}");
        let signed = Signed::sign(manifest, &operator).unwrap();
        let config = Config {
            jitter_ms: 10_000,
            ..Config::default()
        };
        let err = Membership::new(config, signed, key(1), 1).unwrap_err();
        assert!(err.to_string().contains("jitter_ms"), "{err}");
    }

    /// The table's index follows its members through every removal (the last member moves
    /// into the freed slot), in a random order of inserts and removals.
    #[test]
    fn table_index_follows_swapped_members() {
        let domain = DomainId([7; 32]);
        let member = |n: u32| {
            let key = many_key(n);
            let advert = Signed::sign(advert(key.node_id(), domain, 1, T0), &key).unwrap();
            Member {
                advert: SharedAdvert::new(advert),
                certificate: None,
                last_heard: at(0),
                filed: at(0),
                joined_at: at(0),
                unroutable: None,
                served: 0,
            }
        };
        let mut table = Table::new(42);
        let mut model: Vec<NodeId> = Vec::new();
        let mut rng = SeededRng::new(3);
        let mut next = 0u32;
        for _ in 0..600 {
            if model.is_empty() || rng.below(3) > 0 {
                let m = member(next);
                next += 1;
                model.push(m.node());
                let slot = table.push(m);
                assert_eq!(slot as usize, model.len() - 1);
            } else {
                let node = model.swap_remove(rng.index(model.len()));
                let removed = table.remove(&node).unwrap();
                assert_eq!(removed.member.node(), node);
                assert!(table.remove(&node).is_none());
            }
            assert_eq!(table.len(), model.len());
            assert_eq!(table.index.len(), model.len());
            for (i, node) in (0u32..).zip(table.keys()) {
                assert_eq!(table.slot(&node), Some(i));
            }
            let mut held: Vec<NodeId> = table.keys().collect();
            let mut expected = model.clone();
            held.sort();
            expected.sort();
            assert_eq!(held, expected);
        }
        assert!(!table.contains_key(&many_key(next).node_id()));
    }
}
