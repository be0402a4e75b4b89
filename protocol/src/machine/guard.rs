//! The guard: who may talk to this node, and who is penalised or banned.
//!
//! [`Guard`] is the sans-IO half of the swarm actor's security decisions, beside
//! [`Membership`] (which judges the content of gossip): per-peer budgets for gossip and control
//! RPCs ([`PeerBudget`]), the filter of re-wrapped certificates ([`RepeatFilter`]), the cache
//! of verified certificates of nodes outside the member table (gateways), the scores of
//! penalised peers and their bans, the authorisation of chat requests and of member-snapshot
//! reads, and the dispatch of one decoded gossip message ([`Guard::gossip`]). Peers are named
//! by their [`NodeId`] (a libp2p peer id of a secp256k1 key maps to exactly one); the caller
//! carries out the [`GuardAction`]s (gossip scores, disconnections) on its transport.
//!
//! # Penalties and bans
//!
//! Each penalty lowers a peer's score by [`GuardConfig::penalty`]; at
//! [`GuardConfig::ban_after`] penalties the peer is banned for [`GuardConfig::ban_ms`]: its
//! connections are closed and its requests refused. Scores recover by one penalty per
//! [`GuardConfig::forgive_ms`], so an honest peer that now and then trips a check (a copy
//! delayed past a window) is never banned for it over months, while a peer that keeps breaking
//! the protocol is. Scores are kept for at most
//! [`GuardConfig::max_tracked`] peers (the worst kept first).

use std::collections::HashMap;

use super::Millis;
use super::membership::{self, Action, Event, Membership, Verdict};
use super::rate::{PeerBudget, Repeat, RepeatFilter, Spend};
use crate::domain::{Admission, MAX_CLOCK_SKEW_SECS, MembershipCertificate};
use crate::gossip::GossipMessage;
use crate::{NodeId, Signed};

/// The guard's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    /// The heartbeat interval of the domain, in milliseconds (budgets are per heartbeat).
    pub heartbeat_ms: u64,
    /// What one penalty takes off a peer's score. Default 10 (the gossip layer's application
    /// score weight is set for it).
    pub penalty: f64,
    /// Penalties until a ban. Default 5.
    pub ban_after: u32,
    /// How long a ban lasts, in milliseconds. Default 600 000.
    pub ban_ms: u64,
    /// A score recovers by one penalty per this many milliseconds. Default 600 000.
    pub forgive_ms: u64,
    /// The most peers tracked in each table (scores, bans, budgets, certificates). Default
    /// 4 096.
    pub max_tracked: usize,
    /// Control requests a peer may send per second, and in a burst. Defaults 16 and 64.
    pub rpc_per_sec: f64,
    /// See [`rpc_per_sec`](Self::rpc_per_sec).
    pub rpc_burst: f64,
    /// Every how many heartbeats the manifest and revocations are re-gossiped (the gossip
    /// budget allows for it). Default 5.
    pub regossip_heartbeats: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 10_000,
            penalty: 10.0,
            ban_after: 5,
            ban_ms: 600_000,
            forgive_ms: 600_000,
            max_tracked: 4096,
            rpc_per_sec: 16.0,
            rpc_burst: 64.0,
            regossip_heartbeats: 5,
        }
    }
}

/// What the caller does for the guard.
#[derive(Debug, Clone, PartialEq)]
pub enum GuardAction {
    /// `node`'s score is now `score` (set it as its gossip application score).
    Penalised {
        /// The peer.
        node: NodeId,
        /// Its score after the penalty.
        score: f64,
        /// Why, for the log.
        reason: String,
    },
    /// `node` is banned until `until`: close its connections.
    Banned {
        /// The peer.
        node: NodeId,
        /// When the ban ends.
        until: Millis,
    },
}

/// What became of one gossip message.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipOutcome {
    /// Forward it, drop it, or drop it and blame the deliverer (already penalised).
    pub verdict: Verdict,
    /// The node the accepted message is about (the advert's node, the certificate's member,
    /// the manifest's operator).
    pub author: Option<NodeId>,
    /// The author is not admitted by this node's manifest and may hold a newer one: ask it
    /// for the domain's state.
    pub ask_domain_state: bool,
    /// Accepted vouchers, their signatures checked for the share's escrow: for the node's
    /// payments, when the escrow is its own.
    pub vouchers: Option<crate::payment::VoucherShare>,
}

/// The most voucher shares an entry node publishes a second (it batches what it debits for
/// a quarter of a second).
pub const VOUCHER_SHARES_PER_SEC: f64 = 4.0;

/// The guard of one node's domain. See the [module docs](self).
#[derive(Debug)]
pub struct Guard {
    config: GuardConfig,
    /// Scores (zero or below) and when each was last set.
    scores: HashMap<NodeId, (f64, Millis)>,
    banned: HashMap<NodeId, Millis>,
    /// Verified certificates of nodes that may not be in the member table (gateways).
    certificates: HashMap<NodeId, Signed<MembershipCertificate>>,
    gossip_budget: PeerBudget,
    /// Vouchers have a budget of their own: busy entry nodes publish several shares a second,
    /// far more often than anything else on the topic.
    voucher_budget: PeerBudget,
    rpc_budget: PeerBudget,
    certificate_repeats: RepeatFilter<NodeId>,
    actions: Vec<GuardAction>,
}

impl Guard {
    /// A guard with nothing tracked.
    pub fn new(config: GuardConfig) -> Self {
        let max = config.max_tracked;
        Self {
            config,
            scores: HashMap::new(),
            banned: HashMap::new(),
            certificates: HashMap::new(),
            gossip_budget: PeerBudget::new(max),
            voucher_budget: PeerBudget::new(max),
            rpc_budget: PeerBudget::new(max),
            certificate_repeats: RepeatFilter::new(max),
            actions: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GuardConfig {
        &self.config
    }

    /// The actions to carry out since the last call.
    pub fn take_actions(&mut self) -> Vec<GuardAction> {
        std::mem::take(&mut self.actions)
    }

    /// Whether `node` is banned at `now`.
    pub fn is_banned(&self, node: &NodeId, now: Millis) -> bool {
        self.banned.get(node).is_some_and(|until| now < *until)
    }

    /// Forgets the bans that ended and the scores that recovered.
    pub fn expire(&mut self, now: Millis) {
        self.banned.retain(|_, until| *until > now);
        let (penalty, forgive) = (self.config.penalty, self.config.forgive_ms);
        self.scores
            .retain(|_, (score, at)| recovered(*score, *at, now, penalty, forgive) < 0.0);
    }

    /// The score of every penalised peer at `now` (below zero).
    pub fn scores(&self, now: Millis) -> impl Iterator<Item = (NodeId, f64)> + '_ {
        let (penalty, forgive) = (self.config.penalty, self.config.forgive_ms);
        self.scores.iter().filter_map(move |(node, (score, at))| {
            let score = recovered(*score, *at, now, penalty, forgive);
            (score < 0.0).then_some((*node, score))
        })
    }

    /// Lowers `node`'s score, and bans it once it reached the ban score.
    pub fn penalise(&mut self, node: NodeId, reason: impl Into<String>, now: Millis) {
        let penalty = self.config.penalty;
        let forgive = self.config.forgive_ms;
        if self.scores.len() >= self.config.max_tracked && !self.scores.contains_key(&node) {
            self.scores.retain(|_, (score, at)| {
                recovered(*score, *at, now, penalty, forgive) <= -penalty * 2.0
            });
            if self.scores.len() >= self.config.max_tracked {
                return;
            }
        }
        let entry = self.scores.entry(node).or_insert((0.0, now));
        let score = recovered(entry.0, entry.1, now, penalty, forgive) - penalty;
        *entry = (score, now);
        self.actions.push(GuardAction::Penalised {
            node,
            score,
            reason: reason.into(),
        });
        // Half a penalty of slack: the recovery since the first of them must not save a peer
        // that broke the protocol `ban_after` times in a few minutes.
        let ban_score = -penalty * (f64::from(self.config.ban_after) - 0.5);
        if score <= ban_score && !self.is_banned(&node, now) {
            let until = now.plus(self.config.ban_ms);
            if self.banned.len() < self.config.max_tracked {
                self.banned.insert(node, until);
            }
            self.actions.push(GuardAction::Banned { node, until });
        }
    }

    /// A verified certificate of `node` held for [`authorize`](Self::authorize), if any.
    pub fn certificate(&self, node: &NodeId) -> Option<&Signed<MembershipCertificate>> {
        self.certificates.get(node)
    }

    /// How many certificates are held.
    pub fn certificate_count(&self) -> usize {
        self.certificates.len()
    }

    /// Keeps a certificate of a node for [`authorize`](Self::authorize) if it is valid now
    /// and not revoked (bounded: expired ones make room first).
    pub fn remember_certificate(
        &mut self,
        membership: &Membership,
        certificate: &Signed<MembershipCertificate>,
        now: Millis,
    ) {
        let node = certificate.payload.member;
        if membership
            .manifest()
            .verify_certificate(certificate, now.as_secs())
            .is_err()
            || membership.is_revoked(&node, certificate.payload.serial)
        {
            return;
        }
        if self.certificates.len() >= self.config.max_tracked
            && !self.certificates.contains_key(&node)
        {
            let now_secs = now.as_secs();
            self.certificates
                .retain(|_, c| c.payload.expires_at > now_secs);
            if self.certificates.len() >= self.config.max_tracked {
                return;
            }
        }
        self.certificates.insert(node, certificate.clone());
    }

    /// Follows the membership machine's actions that concern the guard (a revoked member's
    /// certificate is dropped).
    pub fn on_membership_action(&mut self, action: &Action) {
        if let Action::MemberLeft { node, reason } = action
            && *reason == membership::LeaveReason::Revoked
        {
            self.certificates.remove(node);
        }
    }

    /// Whether `node` may send chat requests: a valid member of the domain (in the table, or
    /// holding a verified, unrevoked certificate), not banned. The error says why not.
    pub fn authorize(
        &self,
        node: NodeId,
        membership: Option<&Membership>,
        now: Millis,
    ) -> Result<(), String> {
        if self.is_banned(&node, now) {
            return Err(format!("{node} is banned for breaking the protocol"));
        }
        let m = membership
            .ok_or_else(|| "this node is not in a domain and serves no peers".to_string())?;
        let manifest = m.manifest();
        if !manifest.admission.admits(&node) {
            return Err(format!(
                "{node} is not admitted by the domain's admission policy"
            ));
        }
        if matches!(manifest.admission, Admission::Open) || m.member(&node).is_some() {
            return Ok(());
        }
        match self.certificates.get(&node) {
            Some(certificate) => {
                manifest
                    .verify_certificate(certificate, now.as_secs())
                    .map_err(|e| format!("the certificate of {node} is not valid: {e}"))?;
                if m.is_revoked(&node, certificate.payload.serial) {
                    return Err(format!("the certificate of {node} was revoked"));
                }
                Ok(())
            }
            None => Err(format!(
                "{node} has no valid membership certificate for this domain"
            )),
        }
    }

    /// Whether `node` may read member snapshots: anyone in an open domain; in others, only a
    /// certified member (in the table, or a gateway whose certificate was verified), so the
    /// member table is not handed to strangers.
    pub fn may_read_members(&self, node: &NodeId, membership: &Membership) -> bool {
        matches!(membership.manifest().admission, Admission::Open)
            || membership.member(node).is_some()
            || self.certificates.contains_key(node)
    }

    /// Charges one control request to `node`'s budget; a peer that stays over it is
    /// penalised once per heartbeat. Anything but [`Spend::Allowed`] is answered `Busy`.
    pub fn control_request(&mut self, node: NodeId, now: Millis) -> Spend {
        let spend = self.rpc_budget.spend(
            node,
            now,
            self.config.rpc_per_sec,
            self.config.rpc_burst,
            self.config.heartbeat_ms,
        );
        if spend == Spend::OverAgain {
            self.penalise(node, "floods control requests (over its budget)", now);
        }
        spend
    }

    /// Judges one decoded gossip message delivered by `from` (the peer the message came
    /// from, authenticated by its connection; not its author): the deliverer's budget, then
    /// the content through `membership` (whose actions are appended to `actions`; the
    /// caller runs them, penalties included through [`penalise`](Self::penalise)).
    pub fn gossip(
        &mut self,
        membership: &mut Membership,
        from: NodeId,
        message: GossipMessage,
        now: Millis,
        actions: &mut Vec<Action>,
    ) -> GossipOutcome {
        let mut outcome = GossipOutcome {
            verdict: Verdict::Ignore(membership::Ignored::OverBudget),
            author: None,
            ask_domain_state: false,
            vouchers: None,
        };
        let within = if matches!(message, GossipMessage::Vouchers(_)) {
            self.within_voucher_budget(from, membership, now)
        } else {
            self.within_gossip_budget(from, membership, now)
        };
        if !within {
            return outcome;
        }
        let start = actions.len();
        outcome.verdict = match message {
            GossipMessage::Advert(entry) => {
                let node = entry.advert.payload.node;
                outcome.author = Some(node);
                let verdict = membership.handle(
                    now,
                    Event::AdvertReceived {
                        from,
                        advert: entry.advert,
                        certificate: entry.certificate,
                    },
                    actions,
                );
                // A node this manifest does not admit may hold a newer one that does. It is
                // penalised meanwhile, so a node really not admitted is still banned for
                // insisting.
                outcome.ask_domain_state = matches!(
                    verdict,
                    Verdict::Reject(membership::Rejection::NotAdmitted { .. })
                ) && from == node;
                // A valid advert of a node this one did not hold is news, and costs its
                // deliverer nothing: in a cold start thousands of nodes publish their first
                // adverts within seconds, before any table knows how large the domain is,
                // and a peer passing them on is not flooding. (Updates of members, replays,
                // and refused or stale content still cost; a new identity costs its maker a
                // key and a signature as much as it costs this node a check.)
                let news = matches!(
                    verdict,
                    Verdict::Ignore(membership::Ignored::TableFull { .. })
                ) || actions[start..].iter().any(
                    |a| matches!(a, Action::MemberJoined { node: joined, .. } if *joined == node),
                );
                if news {
                    self.gossip_budget.refund(from);
                }
                match verdict {
                    // Valid, outside this node's view of a domain larger than its table: the
                    // nodes whose view it is in still need it.
                    Verdict::Ignore(membership::Ignored::TableFull { .. }) => Verdict::Accept,
                    other => other,
                }
            }
            GossipMessage::Manifest(manifest) => {
                outcome.author = Some(manifest.payload.operator);
                membership.handle(
                    now,
                    Event::ManifestReceived {
                        from: Some(from),
                        manifest,
                    },
                    actions,
                )
            }
            GossipMessage::Certificate {
                certificate,
                sent_at,
            } => {
                outcome.author = Some(certificate.payload.member);
                if let Some(verdict) = self.certificate_wrapping(from, &certificate, sent_at, now) {
                    outcome.verdict = verdict;
                    return outcome;
                }
                self.remember_certificate(membership, &certificate, now);
                let verdict = membership.handle(
                    now,
                    Event::CertificateReceived {
                        from: Some(from),
                        certificate,
                    },
                    actions,
                );
                // The same certificate again is news for peers that joined since.
                match verdict {
                    Verdict::Ignore(membership::Ignored::Duplicate) => Verdict::Accept,
                    other => other,
                }
            }
            GossipMessage::Revocation(revocation) => {
                let member = revocation.payload.member;
                let serial = revocation.payload.serial;
                let verdict = membership.handle(
                    now,
                    Event::RevocationReceived {
                        from: Some(from),
                        revocation,
                    },
                    actions,
                );
                if verdict == Verdict::Accept
                    && self
                        .certificates
                        .get(&member)
                        .is_some_and(|c| c.payload.serial == serial)
                {
                    self.certificates.remove(&member);
                }
                verdict
            }
            // Vouchers prove themselves: each is signed by its payer's key for the named
            // escrow. A valid one can only lower what other entry nodes let its key spend, so
            // any peer within its budget may pass them on; a forged one is blamed on its
            // deliverer.
            GossipMessage::Vouchers(share) => match share.verify() {
                Ok(()) => {
                    outcome.vouchers = Some(share);
                    Verdict::Accept
                }
                Err(error) => {
                    let reason = error.to_string();
                    self.penalise(from, format!("forged voucher: {reason}"), now);
                    Verdict::Reject(membership::Rejection::BadSignature {
                        what: "voucher",
                        reason,
                    })
                }
            },
        };
        for action in &actions[start..] {
            self.on_membership_action(action);
        }
        outcome
    }

    /// Whether `peer` may deliver one more gossip message now. Its budget per heartbeat is
    /// four times what an honest peer can deliver first (one advert per member of the domain,
    /// a fifth of the revocations, re-gossiped every five heartbeats, the gateways'
    /// certificates) plus 64 for a domain still converging; bursts of four heartbeats' worth
    /// pass. Members count by the domain's estimated size, not the table's: in a domain
    /// larger than the table, peers pass on the adverts of every member (simulated: with the
    /// table's size, 3 000 nodes in a cold start penalised honest peers 881 times). The
    /// first advert of a node new to this one is refunded (see [`Guard::gossip`]).
    fn within_gossip_budget(&mut self, peer: NodeId, m: &Membership, now: Millis) -> bool {
        let per_heartbeat = 4.0
            * (m.domain_size_estimate() as f64
                + self.certificates.len() as f64
                + m.revocation_count() as f64 / self.config.regossip_heartbeats.max(1) as f64)
            + 64.0;
        let per_sec = per_heartbeat / (self.config.heartbeat_ms.max(100) as f64 / 1000.0);
        match self.gossip_budget.spend(
            peer,
            now,
            per_sec,
            per_heartbeat * 4.0,
            self.config.heartbeat_ms,
        ) {
            Spend::Allowed => true,
            Spend::Over => false,
            Spend::OverAgain => {
                self.penalise(
                    peer,
                    "floods the domain topic (over its gossip budget)",
                    now,
                );
                false
            }
        }
    }

    /// Spends one voucher share of `peer`'s budget: [`VOUCHER_SHARES_PER_SEC`] per node that
    /// may be an entry node (every member and certified gateway), plus 16, a second; four
    /// seconds' worth in a burst.
    fn within_voucher_budget(&mut self, peer: NodeId, m: &Membership, now: Millis) -> bool {
        let per_sec = VOUCHER_SHARES_PER_SEC
            * (m.domain_size_estimate() as f64 + self.certificates.len() as f64)
            + 16.0;
        match self
            .voucher_budget
            .spend(peer, now, per_sec, per_sec * 4.0, self.config.heartbeat_ms)
        {
            Spend::Allowed => true,
            Spend::Over => false,
            Spend::OverAgain => {
                self.penalise(peer, "floods the domain topic with vouchers", now);
                false
            }
        }
    }

    /// Checks the unsigned wrapping of a re-published certificate: its `sent_at` must be
    /// recent (a replayed old publication is ignored), and one publication per half heartbeat
    /// is passed on whatever its `sent_at`, so re-wrapping a certificate is not news. A peer
    /// that delivers the same certificate twice within that time is re-wrapping or replaying
    /// it, and is penalised. `None`: go on with the certificate.
    fn certificate_wrapping(
        &mut self,
        via: NodeId,
        certificate: &Signed<MembershipCertificate>,
        sent_at: u64,
        now: Millis,
    ) -> Option<Verdict> {
        let skew_ms = MAX_CLOCK_SKEW_SECS * 1000;
        let window_ms = self.config.heartbeat_ms * 3 + skew_ms;
        if sent_at > now.0.saturating_add(skew_ms) || now.0.saturating_sub(sent_at) > window_ms {
            return Some(Verdict::Ignore(membership::Ignored::TooOld {
                sent_at: sent_at / 1000,
                now: now.as_secs(),
            }));
        }
        match self.certificate_repeats.check(
            certificate.payload.member,
            via,
            now,
            self.config.heartbeat_ms / 2,
        ) {
            Repeat::Fresh => None,
            Repeat::Duplicate => Some(Verdict::Ignore(membership::Ignored::Duplicate)),
            Repeat::Replayed => {
                self.penalise(
                    via,
                    "delivered the same certificate twice within half a heartbeat (re-wrapped \
                     or replayed)",
                    now,
                );
                Some(Verdict::Ignore(membership::Ignored::Duplicate))
            }
        }
    }
}

/// `score`, set at `at`, after recovering one `penalty` per `forgive_ms` until `now` (never
/// above zero).
fn recovered(score: f64, at: Millis, now: Millis, penalty: f64, forgive_ms: u64) -> f64 {
    let credit = penalty * now.since(at) as f64 / forgive_ms.max(1) as f64;
    (score + credit).min(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_penalties_ban_for_the_ban_time_and_bans_expire() {
        let mut guard = Guard::new(GuardConfig::default());
        let node = NodeId([3; 20]);
        let t0 = Millis(1_000_000);
        for i in 1..=4 {
            guard.penalise(node, "test", t0);
            assert!(!guard.is_banned(&node, t0), "after {i}");
        }
        guard.penalise(node, "test", t0);
        assert!(guard.is_banned(&node, t0));
        let actions = guard.take_actions();
        assert_eq!(actions.len(), 6);
        assert!(matches!(
            actions.last(),
            Some(GuardAction::Banned { until, .. }) if *until == t0.plus(600_000)
        ));
        assert!(
            guard
                .authorize(node, None, t0)
                .unwrap_err()
                .contains("banned")
        );
        let later = t0.plus(600_001);
        assert!(!guard.is_banned(&node, later));
        guard.expire(later);
        assert!(guard.banned.is_empty());
    }

    #[test]
    fn scores_recover_so_rare_penalties_never_ban() {
        let mut guard = Guard::new(GuardConfig::default());
        let node = NodeId([5; 20]);
        let mut now = Millis(1_000_000);
        // One penalty every eleven minutes, for a day: never banned, never below one penalty.
        for _ in 0..130 {
            guard.penalise(node, "a late copy", now);
            assert!(!guard.is_banned(&node, now));
            let score = guard.scores(now).next().map_or(0.0, |(_, s)| s);
            assert!(score >= -10.0 - 1e-9, "{score}");
            now = now.plus(660_000);
        }
        guard.expire(now);
        assert_eq!(guard.scores(now).count(), 0);
        // Five in a burst still ban.
        for _ in 0..5 {
            guard.penalise(node, "a flood", now);
        }
        assert!(guard.is_banned(&node, now));
    }

    /// A cold start: one peer passes on 2 000 first adverts within a second, far more than
    /// the budget of the small domain this node saw a moment ago, and is neither cut off
    /// nor penalised (the budget grows with the domain and news is refunded). A peer
    /// delivering only refused content gets the plain budget and a penalty.
    #[test]
    fn the_gossip_budget_follows_the_news_of_a_cold_start() {
        use crate::domain::DomainId;
        use crate::machine::membership::Config;
        use crate::machine::test_support::{advert, key, manifest, many_key};

        let operator = key(100);
        let signed = Signed::sign(manifest(&operator, Admission::Open), &operator).unwrap();
        let domain = signed.payload.id();
        let mut m = Membership::new(Config::default(), signed, key(1), 7).unwrap();
        let mut guard = Guard::new(GuardConfig::default());
        let relay = NodeId([9; 20]);
        let now_secs = 1_700_000_100;
        let mut accepted = 0;
        for i in 0..2000 {
            let node = many_key(i);
            let signed = Signed::sign(advert(node.node_id(), domain, 1, now_secs), &node).unwrap();
            let message = GossipMessage::Advert(crate::control::MemberEntry {
                advert: signed.into(),
                certificate: None,
            });
            let now = Millis::from_secs(now_secs).plus(u64::from(i) / 2);
            let outcome = guard.gossip(&mut m, relay, message, now, &mut Vec::new());
            accepted += usize::from(outcome.verdict == Verdict::Accept);
        }
        assert_eq!(accepted, 2000);
        assert!(guard.take_actions().is_empty(), "no penalty");

        // Refused content (adverts of another domain) counts against the deliverer alone.
        let flooder = NodeId([8; 20]);
        let mut passed = 0;
        let now = Millis::from_secs(now_secs + 1);
        let foreign: Vec<GossipMessage> = (0..50)
            .map(|i| {
                let node = many_key(i);
                let advert = advert(node.node_id(), DomainId([7; 32]), 1, now_secs);
                GossipMessage::Advert(crate::control::MemberEntry {
                    advert: Signed::sign(advert, &node).unwrap().into(),
                    certificate: None,
                })
            })
            .collect();
        // The domain now has about 2 000 members: a burst of about 32 000 messages.
        for i in 0..50_000 {
            let message = foreign[i % 50].clone();
            let outcome = guard.gossip(&mut m, flooder, message, now, &mut Vec::new());
            passed += usize::from(!matches!(
                outcome.verdict,
                Verdict::Ignore(membership::Ignored::OverBudget)
            ));
        }
        assert!(passed < 40_000, "the flood is cut off after {passed}");
        assert!(
            guard
                .take_actions()
                .iter()
                .any(|a| matches!(a, GuardAction::Penalised { node, .. } if *node == flooder))
        );
    }

    /// Vouchers that verify for the escrow they name are accepted and handed on; a forged one
    /// (its amount raised after signing) is rejected and its deliverer penalised; a deliverer
    /// past the voucher budget is cut off, then penalised.
    #[test]
    fn vouchers_are_checked_and_have_a_budget_of_their_own() {
        use crate::machine::membership::Config;
        use crate::machine::test_support::{key, manifest};
        use crate::payment::{Escrow, Voucher, VoucherShare};

        let operator = key(100);
        let signed = Signed::sign(manifest(&operator, Admission::Open), &operator).unwrap();
        let mut m = Membership::new(Config::default(), signed, key(1), 7).unwrap();
        let mut guard = Guard::new(GuardConfig::default());
        let (relay, forger) = (NodeId([9; 20]), NodeId([8; 20]));
        let escrow = Escrow {
            chain_id: 1337,
            contract: NodeId([0xec; 20]),
        };
        let payer = key(50);
        let voucher = |amount| {
            Voucher {
                payer: payer.node_id(),
                payee: key(2).node_id(),
                entry: key(3).node_id(),
                cumulative_amount: amount,
                expires_at: 2_000_000_000,
            }
            .sign(&escrow, &payer)
            .unwrap()
        };
        let now = Millis(1_700_000_000_000);
        let mut actions = Vec::new();
        let share = VoucherShare {
            escrow,
            vouchers: vec![voucher(10), voucher(20)],
        };
        let outcome = guard.gossip(
            &mut m,
            relay,
            GossipMessage::Vouchers(share.clone()),
            now,
            &mut actions,
        );
        assert_eq!(outcome.verdict, Verdict::Accept);
        assert_eq!(outcome.vouchers, Some(share));
        let mut forged = voucher(30);
        forged.voucher.cumulative_amount = 3_000;
        let outcome = guard.gossip(
            &mut m,
            forger,
            GossipMessage::Vouchers(VoucherShare {
                escrow,
                vouchers: vec![voucher(40), forged],
            }),
            now,
            &mut actions,
        );
        assert!(matches!(outcome.verdict, Verdict::Reject(_)));
        assert_eq!(outcome.vouchers, None);
        assert!(guard.scores(now).any(|(n, s)| n == forger && s < 0.0));
        assert!(!guard.scores(now).any(|(n, _)| n == relay));
        // The budget: 4 a second per possible entry node plus 16, four seconds in a burst.
        let burst =
            ((VOUCHER_SHARES_PER_SEC * m.domain_size_estimate() as f64 + 16.0) * 4.0) as usize;
        let flood = VoucherShare {
            escrow,
            vouchers: vec![voucher(50)],
        };
        let mut accepted = 0;
        for _ in 0..burst + 40 {
            let outcome = guard.gossip(
                &mut m,
                relay,
                GossipMessage::Vouchers(flood.clone()),
                now,
                &mut actions,
            );
            accepted += usize::from(outcome.verdict == Verdict::Accept);
        }
        assert!(accepted < burst + 2, "{accepted} of a burst of {burst}");
        assert!(accepted + 2 >= burst, "{accepted} of a burst of {burst}");
        assert!(guard.scores(now).any(|(n, s)| n == relay && s < 0.0));
        // Other gossip of that peer still has its own budget.
        assert!(guard.within_gossip_budget(relay, &m, now));
    }

    #[test]
    fn control_floods_get_busy_and_one_penalty_per_heartbeat() {
        let mut guard = Guard::new(GuardConfig::default());
        let node = NodeId([4; 20]);
        let t0 = Millis(1_000_000);
        let spends: Vec<Spend> = (0..80).map(|_| guard.control_request(node, t0)).collect();
        assert_eq!(spends.iter().filter(|s| **s == Spend::Allowed).count(), 64);
        let penalties = guard
            .take_actions()
            .into_iter()
            .filter(|a| matches!(a, GuardAction::Penalised { .. }))
            .count();
        assert_eq!(penalties, 1);
    }
}
