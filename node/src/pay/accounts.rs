//! Paid access keys on the API: each request of an access key is checked against the key's
//! deposit in the domain's escrow and debited by what it cost.
//!
//! An access key (`Authorization: Bearer gaia-sk-…`, from `gaia pay deposit`) is the secret
//! key of an escrow account. Before a paid request runs, [`Payments::open_tab`] reserves its
//! largest possible cost (a bound on the prompt's tokens from its bytes and `max_tokens`, at
//! the highest prices a member may charge: the domain manifest's, else `payments.max_price`)
//! against what the account has left; if that does not fit
//! the request is refused with 402. As each round ends it is debited
//! ([`Tab::charge`]): a relayed round by the amount of the serving node's checked receipt, a
//! round served here at this node's prices; a debit is a new cumulative voucher signed with the
//! access key and synced to the [`VoucherBook`] before the round's end reaches the client.
//! Closing the tab (when the response is done) frees what was reserved.
//!
//! Every entry node debits on channels of its own (payer, payee, entry), and tells the domain
//! of each new voucher on its gossip topic ([`Payments::outgoing`]); the others take it into
//! account ([`Payments::learn`]). What an account has left, as this node sees it: the deposit
//! still in the escrow, less what every channel it knows (its own and those learnt) signed
//! beyond what the escrow already paid it, less what this node's requests in flight reserved.
//! The escrow is read from the chain when first needed, again after [`REFRESH`], and when a
//! request does not fit (a new deposit), at most once per [`RETRY`]. What two entry nodes can
//! overspend together is bounded by what each debits before the other hears of it (one gossip
//! delay) plus what each has reserved: ARCHITECTURE.md states the bound.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaia_protocol::domain::Pricing;
use gaia_protocol::payment::{self, Price, SignedVoucher};
use gaia_protocol::{NodeId, SecretKey};
use tokio::sync::OnceCell;

use super::chain::{ChainError, Escrow, Sent};
use super::unix_now;
use super::vouchers::{BookError, VoucherBook};
use crate::config::PaymentsConfig;

/// How long an account read from the chain is trusted.
pub const REFRESH: Duration = Duration::from_secs(10);
/// The shortest time between two reads of one account.
pub const RETRY: Duration = Duration::from_secs(1);
/// The most accounts kept in memory (a flood of made-up keys must not grow the node without
/// bound): past it, stale ones are forgotten.
const MAX_VIEWS: usize = 100_000;
/// The most account reads in flight on the chain at once.
const MAX_READS: usize = 8;
/// The most channels of other entry nodes kept (a flood of vouchers signed by made-up keys
/// must not grow the node without bound): past it, those of accounts this node does not
/// serve are forgotten first.
const MAX_LEARNT: usize = 100_000;
/// The shortest time between two shares of an entry node's vouchers: at most four a second,
/// what the domain's guards expect of it
/// ([`gaia_protocol::machine::guard::VOUCHER_SHARES_PER_SEC`]). A debit after a quiet spell
/// goes out at once.
pub const SHARE_EVERY: Duration = Duration::from_millis(250);
/// How long the first new voucher waits for others to go with it.
const SHARE_COALESCE: Duration = Duration::from_millis(5);
/// The most vouchers told in one gossip message.
pub const SHARE_BATCH: usize = gaia_protocol::gossip::MAX_VOUCHERS_PER_MESSAGE;

/// Why a paid request cannot run, or its debit failed.
#[derive(Debug, thiserror::Error)]
pub enum PayError {
    /// The key has no deposit at this escrow (a key of another domain, or never funded).
    #[error(
        "access key {payer} has no deposit in this domain's escrow {contract} on chain \
         {chain_id}; deposit with `gaia pay deposit --account {payer}`"
    )]
    NoAccount {
        /// The key's account.
        payer: NodeId,
        /// The escrow.
        contract: NodeId,
        /// Its chain.
        chain_id: u64,
    },
    /// The deposit expired.
    #[error("the deposit of access key {payer} expired at {expires_at} (unix seconds)")]
    Expired {
        /// The key's account.
        payer: NodeId,
        /// When.
        expires_at: u64,
    },
    /// What is left does not cover the request's largest cost.
    #[error(
        "access key {payer} has {remaining} left, and this request may cost up to {needed} \
         ({prompt_tokens} prompt and {completion_tokens} completion tokens at {price}); deposit \
         more or ask for fewer max_tokens"
    )]
    Insufficient {
        /// The key's account.
        payer: NodeId,
        /// What is left.
        remaining: u128,
        /// The largest cost of the request.
        needed: u128,
        /// The prompt tokens it may use.
        prompt_tokens: u64,
        /// The completion tokens it may use.
        completion_tokens: u64,
        /// The prices it was reserved at.
        price: Price,
    },
    /// The escrow is not the one the domain's manifest describes.
    #[error("{0}")]
    WrongEscrow(String),
    /// The chain could not be asked.
    #[error("the domain's payment chain cannot be reached: {0}")]
    Chain(#[from] ChainError),
    /// The debit could not be recorded.
    #[error(transparent)]
    Book(#[from] BookError),
}

/// What an account has, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Balance {
    /// The account (the access key's address).
    pub account: NodeId,
    /// Deposited in the escrow and not yet paid out.
    pub escrow_balance: u128,
    /// Spent through this node (its vouchers), redeemed or not.
    pub spent: u128,
    /// Spent through other entry nodes, as far as this node heard, redeemed or not.
    pub spent_elsewhere: u128,
    /// Reserved by requests in flight here.
    pub reserved: u128,
    /// What is left for new requests.
    pub remaining: u128,
    /// When the deposit expires (unix seconds).
    pub expires_at: u64,
}

/// A channel of an account: (payee, entry node).
type Channel = (NodeId, NodeId);

/// An account as last read from the chain, and what is reserved on it.
#[derive(Debug, Clone)]
struct View {
    balance: u128,
    /// What the escrow had paid each channel known at the read.
    redeemed: BTreeMap<Channel, u128>,
    expires_at: u64,
    /// Whether anything was ever deposited (an unknown account reads as all zeroes).
    exists: bool,
    read_at: Instant,
    reserved: u128,
}

/// Why [`Payments::reserve`] refused.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NoAccount,
    Expired(u64),
    Insufficient(u128),
}

/// A node's paid access: its escrow, its voucher book, the accounts it saw.
pub struct Payments {
    config: PaymentsConfig,
    escrow: payment::Escrow,
    node_key: SecretKey,
    chain: OnceCell<Escrow>,
    book: VoucherBook,
    views: std::sync::Mutex<HashMap<NodeId, View>>,
    reads: tokio::sync::Semaphore,
    /// Other entry nodes' latest cumulative amounts, per account and channel.
    learnt: std::sync::Mutex<Learnt>,
    /// The domain's operator and pricing, from its manifest (`None` outside a domain).
    domain: std::sync::Mutex<Option<(NodeId, Option<Pricing>)>>,
    /// The escrow's operator and share, read once from the chain.
    terms: OnceCell<(NodeId, u16)>,
    /// This node's new vouchers not yet told to the domain, latest per channel.
    outbox: std::sync::Mutex<BTreeMap<(NodeId, NodeId), SignedVoucher>>,
    sent: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Learnt {
    /// The latest voucher of each channel, signature kept so it can be passed on to an entry
    /// node that catches up ([`Payments::vouchers_after`]).
    accounts: HashMap<NodeId, BTreeMap<Channel, SignedVoucher>>,
    channels: usize,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("escrow", &self.escrow)
            .field("rpc_url", &self.config.rpc_url)
            .finish_non_exhaustive()
    }
}

impl Payments {
    /// The paid access of a node with `node_key` (which signs its settlement transactions),
    /// keeping its voucher book in `dir` (in memory when `None`). The chain is reached on
    /// first use, so a node starts while its chain is down.
    pub fn open(
        config: &PaymentsConfig,
        node_key: SecretKey,
        dir: Option<&Path>,
    ) -> Result<Arc<Self>, String> {
        let contract: NodeId = config
            .contract
            .parse()
            .map_err(|e| format!("payments.contract: {e}"))?;
        let escrow = payment::Escrow {
            chain_id: config.chain_id,
            contract,
        };
        let entry = node_key.node_id();
        let book = match dir {
            None => VoucherBook::in_memory(escrow, entry),
            Some(dir) => {
                VoucherBook::open(dir, escrow, entry)
                    .map_err(|e| format!("cannot open the voucher book: {e}"))?
                    .0
            }
        };
        Ok(Arc::new(Self {
            config: config.clone(),
            escrow,
            node_key,
            chain: OnceCell::new(),
            book,
            views: std::sync::Mutex::default(),
            reads: tokio::sync::Semaphore::new(MAX_READS),
            learnt: std::sync::Mutex::default(),
            domain: std::sync::Mutex::default(),
            terms: OnceCell::new(),
            outbox: std::sync::Mutex::default(),
            sent: tokio::sync::Notify::new(),
        }))
    }

    /// This node's prices.
    pub fn price(&self) -> Price {
        self.config.prices()
    }

    /// The most a paid request may be charged: the domain's price when its manifest states
    /// one, else `payments.max_price` (or this node's own prices).
    pub fn max_price(&self) -> Price {
        match self.domain_pricing() {
            Some(pricing) => pricing.price,
            None => self.config.ceiling(),
        }
    }

    /// The domain's pricing, when its manifest states one.
    pub fn domain_pricing(&self) -> Option<Pricing> {
        self.lock_domain().and_then(|(_, pricing)| pricing)
    }

    /// Takes the domain's operator and pricing from the manifest this node holds (again when
    /// a newer version comes).
    pub fn set_domain(&self, operator: NodeId, pricing: Option<Pricing>) {
        let mut domain = self.domain.lock().unwrap_or_else(|p| p.into_inner());
        *domain = Some((operator, pricing));
    }

    fn lock_domain(&self) -> Option<(NodeId, Option<Pricing>)> {
        *self.domain.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that the escrow is the domain's: run by its operator and paying the operator
    /// the share its manifest states. (Outside a domain, or in one without prices, any escrow
    /// the node is pointed at is taken as it is.)
    async fn check_escrow(&self, chain: &Escrow) -> Result<(), PayError> {
        let Some((operator, Some(pricing))) = self.lock_domain() else {
            return Ok(());
        };
        let (escrow_operator, share) = *self.terms.get_or_try_init(|| chain.terms()).await?;
        if escrow_operator != operator || share != pricing.operator_share_bps {
            return Err(PayError::WrongEscrow(format!(
                "the escrow {} is run by {escrow_operator} and pays its operator {share} basis \
                 points, but the domain's manifest names operator {operator} and a share of {} \
                 basis points: point payments.contract at the domain's escrow",
                self.escrow.contract, pricing.operator_share_bps
            )));
        }
        Ok(())
    }

    /// The escrow.
    pub fn escrow(&self) -> &payment::Escrow {
        &self.escrow
    }

    /// The voucher book.
    pub fn book(&self) -> &VoucherBook {
        &self.book
    }

    async fn chain(&self) -> Result<&Escrow, ChainError> {
        self.chain
            .get_or_try_init(|| {
                Escrow::connect(
                    &self.config.rpc_url,
                    self.config.chain_id,
                    self.escrow.contract,
                    &self.node_key,
                )
            })
            .await
    }

    /// Reads `payer`'s account from the chain: what was redeemed on each channel this node
    /// knows first, then the balance, so that a redeem in between makes what is left look
    /// smaller, never larger.
    async fn read(&self, payer: NodeId) -> Result<View, PayError> {
        let _permit = self.reads.acquire().await;
        let chain = self.chain().await?;
        self.check_escrow(chain).await?;
        let mut redeemed = BTreeMap::new();
        for channel in self.channels(payer).into_keys() {
            let paid = chain.redeemed(payer, channel.0, channel.1).await?;
            redeemed.insert(channel, paid);
        }
        let account = chain.account(payer).await?;
        let exists =
            account.expires_at != 0 || account.balance != 0 || redeemed.values().any(|r| *r != 0);
        Ok(View {
            balance: account.balance,
            redeemed,
            expires_at: account.expires_at,
            exists,
            read_at: Instant::now(),
            reserved: 0,
        })
    }

    /// The latest cumulative amount of each channel of `payer` this node knows: its own, and
    /// those it learnt from other entry nodes.
    fn channels(&self, payer: NodeId) -> BTreeMap<Channel, u128> {
        let mut channels: BTreeMap<Channel, u128> = self
            .learnt()
            .accounts
            .get(&payer)
            .map(|c| {
                c.iter()
                    .map(|(k, v)| (*k, v.voucher.cumulative_amount))
                    .collect()
            })
            .unwrap_or_default();
        for v in self.book.spent(payer) {
            channels.insert((v.payee, v.entry), v.cumulative_amount);
        }
        channels
    }

    /// What `payer` spent through this node, and through others as far as this node heard.
    fn spent(&self, payer: NodeId) -> (u128, u128) {
        let here = self.node_key.node_id();
        self.channels(payer).into_iter().fold(
            (0u128, 0u128),
            |(ours, theirs), ((_, entry), amount)| {
                if entry == here {
                    (ours.saturating_add(amount), theirs)
                } else {
                    (ours, theirs.saturating_add(amount))
                }
            },
        )
    }

    fn remaining(&self, payer: NodeId, view: &View) -> u128 {
        // Each channel owes what it signed beyond what the escrow already paid it (and the
        // balance no longer holds); a channel not known at the read owes all it signed.
        let owed = self
            .channels(payer)
            .into_iter()
            .fold(0u128, |sum, (channel, amount)| {
                let paid = view.redeemed.get(&channel).copied().unwrap_or(0);
                sum.saturating_add(amount.saturating_sub(paid))
            });
        view.balance
            .saturating_sub(owed)
            .saturating_sub(view.reserved)
    }

    fn learnt(&self) -> std::sync::MutexGuard<'_, Learnt> {
        self.learnt.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes other entry nodes' vouchers into account (from the domain's gossip; their
    /// signatures already checked for `escrow`). Vouchers of another escrow and this node's own
    /// are ignored; a lower amount than one already known changes nothing. Returns how many
    /// raised what this node knew.
    pub fn learn(&self, escrow: &payment::Escrow, vouchers: &[SignedVoucher]) -> usize {
        if *escrow != self.escrow {
            return 0;
        }
        let here = self.node_key.node_id();
        let mut raised = 0;
        let mut learnt = self.learnt();
        for signed in vouchers {
            let v = signed.voucher;
            if v.entry == here {
                continue;
            }
            let known = learnt
                .accounts
                .get(&v.payer)
                .and_then(|c| c.get(&(v.payee, v.entry)))
                .map(|s| s.voucher.cumulative_amount);
            match known {
                Some(amount) if amount >= v.cumulative_amount => continue,
                Some(_) => {}
                None => {
                    if learnt.channels >= MAX_LEARNT {
                        // Forget the accounts this node serves nobody of; if that frees
                        // nothing, the voucher is dropped (its account is read from the chain
                        // instead). The views are locked alone: `reserve` locks them first.
                        drop(learnt);
                        let served: std::collections::HashSet<NodeId> =
                            self.views().keys().copied().collect();
                        learnt = self.learnt();
                        learnt.accounts.retain(|payer, _| served.contains(payer));
                        learnt.channels = learnt.accounts.values().map(BTreeMap::len).sum();
                        tracing::debug!(
                            kept = learnt.channels,
                            "too many vouchers learnt from other entry nodes: forgot idle accounts"
                        );
                        if learnt.channels >= MAX_LEARNT {
                            continue;
                        }
                    }
                    learnt.channels += 1;
                }
            }
            learnt
                .accounts
                .entry(v.payer)
                .or_default()
                .insert((v.payee, v.entry), *signed);
            raised += 1;
        }
        raised
    }

    /// The latest voucher of every channel this node knows (its own and those learnt), of
    /// channels after `after` in (payer, payee, entry) order, at most `limit`: what it answers
    /// an entry node catching up.
    pub fn vouchers_after(
        &self,
        after: Option<(NodeId, NodeId, NodeId)>,
        limit: usize,
    ) -> Vec<SignedVoucher> {
        let key = |s: &SignedVoucher| (s.voucher.payer, s.voucher.payee, s.voucher.entry);
        let mut all: Vec<SignedVoucher> = self.book.latest();
        all.extend(
            self.learnt()
                .accounts
                .values()
                .flat_map(|c| c.values().copied()),
        );
        all.retain(|s| after.is_none_or(|after| key(s) > after));
        all.sort_by_key(key);
        all.truncate(limit);
        all
    }

    /// This node's next vouchers to tell the domain: waits for a debit and returns the latest
    /// voucher of each channel debited since the last call (at most [`SHARE_BATCH`]; the rest
    /// come with the next call). The caller waits [`SHARE_EVERY`] between calls.
    pub async fn outgoing(&self) -> Vec<SignedVoucher> {
        loop {
            self.sent.notified().await;
            tokio::time::sleep(SHARE_COALESCE).await;
            let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<_> = outbox.keys().take(SHARE_BATCH).copied().collect();
            let batch: Vec<SignedVoucher> = keys.iter().filter_map(|k| outbox.remove(k)).collect();
            if !outbox.is_empty() {
                self.sent.notify_one();
            }
            if !batch.is_empty() {
                return batch;
            }
        }
    }

    fn share(&self, voucher: SignedVoucher) {
        let v = voucher.voucher;
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((v.payer, v.payee), voucher);
        self.sent.notify_one();
    }

    fn views(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, View>> {
        self.views.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a fresh read of `payer`, keeping what is reserved. A full table first forgets
    /// the accounts read more than [`REFRESH`] ago with nothing reserved (they are read again
    /// when they come back), then others with nothing reserved, down to three quarters (so
    /// the scan is paid once per quarter of the table).
    fn store(&self, payer: NodeId, mut view: View) {
        let mut views = self.views();
        view.reserved = views.get(&payer).map_or(0, |v| v.reserved);
        if views.len() >= MAX_VIEWS && !views.contains_key(&payer) {
            views.retain(|_, v| v.reserved > 0 || v.read_at.elapsed() < REFRESH);
            let excess = views.len().saturating_sub(MAX_VIEWS * 3 / 4);
            let idle: Vec<NodeId> = views
                .iter()
                .filter(|(_, v)| v.reserved == 0)
                .map(|(k, _)| *k)
                .take(excess)
                .collect();
            for key in idle {
                views.remove(&key);
            }
        }
        views.insert(payer, view);
    }

    /// Reserves the largest cost of a request of at most `prompt_tokens` and
    /// `completion_tokens` against `key`'s account, or says why it cannot run.
    pub async fn open_tab(
        self: &Arc<Self>,
        key: SecretKey,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<Tab, PayError> {
        let payer = key.node_id();
        let price = self.max_price();
        let needed = price.cost(prompt_tokens, completion_tokens);
        let mut just_read = false;
        loop {
            match self.reserve(payer, needed, just_read) {
                Some(Ok(expires_at)) => {
                    return Ok(Tab {
                        payments: Arc::clone(self),
                        key,
                        payer,
                        reserved: needed,
                        expires_at,
                    });
                }
                Some(Err(Refusal::NoAccount)) => {
                    return Err(PayError::NoAccount {
                        payer,
                        contract: self.escrow.contract,
                        chain_id: self.escrow.chain_id,
                    });
                }
                Some(Err(Refusal::Expired(expires_at))) => {
                    return Err(PayError::Expired { payer, expires_at });
                }
                Some(Err(Refusal::Insufficient(remaining))) => {
                    return Err(PayError::Insufficient {
                        payer,
                        remaining,
                        needed,
                        prompt_tokens,
                        completion_tokens,
                        price,
                    });
                }
                None => {
                    let view = self.read(payer).await?;
                    self.store(payer, view);
                    just_read = true;
                }
            }
        }
    }

    /// Reserves `needed` on `payer`'s account as last read: the account's expiry, or why
    /// not; `None` when the account must be read first (never read, read more than
    /// [`REFRESH`] ago, or refused on a read older than [`RETRY`]: a deposit may have come).
    fn reserve(
        &self,
        payer: NodeId,
        needed: u128,
        just_read: bool,
    ) -> Option<Result<u64, Refusal>> {
        let mut views = self.views();
        let view = views.get(&payer)?;
        let age = view.read_at.elapsed();
        if !just_read && age >= REFRESH {
            return None;
        }
        let refused = |why| (just_read || age < RETRY).then_some(Err(why));
        if !view.exists {
            return refused(Refusal::NoAccount);
        }
        if view.expires_at <= unix_now() {
            return refused(Refusal::Expired(view.expires_at));
        }
        let remaining = self.remaining(payer, view);
        if remaining < needed {
            return refused(Refusal::Insufficient(remaining));
        }
        let expires_at = view.expires_at;
        if let Some(v) = views.get_mut(&payer) {
            v.reserved = v.reserved.saturating_add(needed);
        }
        Some(Ok(expires_at))
    }

    /// What `payer`'s account has, read from the chain now.
    pub async fn balance(&self, payer: NodeId) -> Result<Balance, PayError> {
        let fresh = self.read(payer).await?;
        self.store(payer, fresh.clone());
        let view = self.views().get(&payer).cloned().unwrap_or(fresh);
        if !view.exists {
            return Err(PayError::NoAccount {
                payer,
                contract: self.escrow.contract,
                chain_id: self.escrow.chain_id,
            });
        }
        let (spent, spent_elsewhere) = self.spent(payer);
        Ok(Balance {
            account: payer,
            escrow_balance: view.balance,
            spent,
            spent_elsewhere,
            reserved: view.reserved,
            remaining: self.remaining(payer, &view),
            expires_at: view.expires_at,
        })
    }

    /// Redeems what is due in the voucher book ([`settle`]), signing with the node key; the
    /// accounts are read again at their next request.
    pub async fn settle(&self) -> Result<Vec<Settled>, ChainError> {
        let chain = self.chain().await?;
        let settled = settle(chain, &self.book.latest()).await;
        self.views().clear();
        settled
    }

    fn release(&self, payer: NodeId, amount: u128) {
        if let Some(view) = self.views().get_mut(&payer) {
            view.reserved = view.reserved.saturating_sub(amount);
        }
    }
}

/// A voucher submitted to the escrow, and what it was to pay.
#[derive(Debug)]
pub struct Settled {
    /// The voucher.
    pub voucher: payment::Voucher,
    /// What it pays beyond what the escrow already paid its channel.
    pub due: u128,
    /// What the account could pay of it (less than `due` when entry nodes together debited
    /// more than it held, the rest redeemable after a top-up), as read just before.
    pub paid: u128,
    /// The transaction, or why it was refused.
    pub outcome: Result<Sent, ChainError>,
}

/// Redeems every voucher of `vouchers` that pays more than the escrow has paid its channel;
/// the others are skipped.
pub async fn settle(
    chain: &Escrow,
    vouchers: &[SignedVoucher],
) -> Result<Vec<Settled>, ChainError> {
    let mut out = Vec::new();
    for signed in vouchers {
        let v = signed.voucher;
        let redeemed = chain.redeemed(v.payer, v.payee, v.entry).await?;
        if redeemed >= v.cumulative_amount {
            continue;
        }
        let due = v.cumulative_amount - redeemed;
        let balance = chain.account(v.payer).await?.balance;
        // An account that cannot cover the voucher (entry nodes together debited more than it
        // held) pays what it has; the rest stays redeemable after a top-up.
        let paid = due.min(balance);
        let outcome = if paid == due {
            chain.redeem(signed).await
        } else if paid > 0 {
            chain.redeem_part(signed, redeemed + paid).await
        } else {
            Err(ChainError::Refused(format!(
                "the account of {} is empty; {due} stays owed until it is topped up",
                v.payer
            )))
        };
        out.push(Settled {
            voucher: v,
            due,
            paid,
            outcome,
        });
    }
    Ok(out)
}

/// Settles the node's voucher book every `every` (`payments.settle_secs`), logging what was
/// redeemed; the node key pays the gas.
pub async fn settle_every(payments: Arc<Payments>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        match payments.settle().await {
            Ok(settled) => {
                for s in settled {
                    let v = s.voucher;
                    match s.outcome {
                        Ok(sent) => tracing::info!(
                            payer = %v.payer, payee = %v.payee, due = %s.due, paid = %s.paid,
                            cumulative = %v.cumulative_amount, tx = %sent.hash, gas = sent.gas_used,
                            "voucher redeemed"
                        ),
                        Err(error) => tracing::warn!(
                            payer = %v.payer, payee = %v.payee, due = %s.due, %error,
                            "the escrow refused a voucher"
                        ),
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot settle: the payment chain cannot be reached")
            }
        }
    }
}

/// A paid request in flight: what it reserved on its account, and how it is debited.
/// Dropping it frees the reservation.
pub struct Tab {
    payments: Arc<Payments>,
    key: SecretKey,
    payer: NodeId,
    reserved: u128,
    expires_at: u64,
}

impl std::fmt::Debug for Tab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tab")
            .field("payer", &self.payer)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

impl Tab {
    /// The paying account.
    pub fn payer(&self) -> NodeId {
        self.payer
    }

    /// The most a serving node may charge.
    pub fn max_price(&self) -> Price {
        self.payments.max_price()
    }

    /// Debits `amount` for `payee` (the serving node) and returns once it is on disk.
    pub async fn charge(&self, payee: NodeId, amount: u128) -> Result<(), PayError> {
        let signed = self
            .payments
            .book
            .debit(&self.key, payee, amount, self.expires_at)
            .await?;
        if let Some(signed) = signed {
            self.payments.share(signed);
        }
        Ok(())
    }

    /// Debits a round this node served: its tokens at its own prices.
    pub async fn charge_here(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<(), PayError> {
        let node = self.payments.node_key.node_id();
        let amount = self.payments.price().cost(prompt_tokens, completion_tokens);
        self.charge(node, amount).await
    }
}

impl crate::swarm::VoucherSource for Payments {
    fn escrow(&self) -> payment::Escrow {
        self.escrow
    }

    fn vouchers_after(
        &self,
        after: Option<gaia_protocol::control::VoucherKey>,
        limit: usize,
    ) -> Vec<SignedVoucher> {
        Payments::vouchers_after(self, after, limit)
    }
}

impl Drop for Tab {
    fn drop(&mut self) {
        self.payments.release(self.payer, self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payments(price: u64) -> Arc<Payments> {
        let config = PaymentsConfig {
            price,
            prompt_price: None,
            completion_price: None,
            max_price: price,
            rpc_url: "http://127.0.0.1:9".into(),
            chain_id: 1337,
            contract: NodeId([0xec; 20]).to_string(),
            settle_secs: 0,
        };
        Payments::open(&config, SecretKey::generate(), None).unwrap()
    }

    fn view(balance: u128, expires_at: u64) -> View {
        View {
            balance,
            redeemed: BTreeMap::new(),
            expires_at,
            exists: balance > 0 || expires_at > 0,
            read_at: Instant::now(),
            reserved: 0,
        }
    }

    #[tokio::test]
    async fn reservations_and_debits_come_out_of_what_is_left() {
        let p = payments(1000);
        let key = SecretKey::generate();
        let payer = key.node_id();
        let later = unix_now() + 3600;
        p.store(payer, view(10_000, later));
        // 6 000 tokens at 1 per token: reserved, then 5 000 more do not fit.
        assert!(matches!(p.reserve(payer, 6_000, false), Some(Ok(_))));
        assert!(matches!(
            p.reserve(payer, 5_000, false),
            Some(Err(Refusal::Insufficient(4_000)))
        ));
        p.release(payer, 6_000);
        // A debit through a tab counts from then on, and the tab frees what it reserved.
        let tab = p.open_tab(key.clone(), 1_000, 2_000).await.unwrap();
        tab.charge(NodeId([1; 20]), 2_500).await.unwrap();
        tab.charge_here(200, 300).await.unwrap();
        drop(tab);
        let view = p.views().get(&payer).cloned().unwrap();
        assert_eq!(view.reserved, 0);
        assert_eq!(p.spent(payer), (3_000, 0));
        assert_eq!(p.remaining(payer, &view), 7_000);
        assert!(matches!(
            p.reserve(payer, 7_001, false),
            Some(Err(Refusal::Insufficient(7_000)))
        ));
    }

    /// Another entry node's vouchers count against what is left here (beyond what the escrow
    /// already paid their channel); an older voucher of a channel changes nothing; this node's
    /// own vouchers and another escrow's are not taken from the domain; a debit here is queued
    /// to be told to the domain.
    #[tokio::test]
    async fn what_other_entry_nodes_spent_counts_against_what_is_left() {
        let p = payments(1000);
        let key = SecretKey::generate();
        let payer = key.node_id();
        let (elsewhere, payee) = (NodeId([0xe1; 20]), NodeId([0xa1; 20]));
        let mut fresh = view(10_000, unix_now() + 3600);
        // The escrow already paid 1 000 on the other entry node's channel.
        fresh.redeemed.insert((payee, elsewhere), 1_000);
        fresh.balance -= 1_000;
        p.store(payer, fresh);
        let sign = |entry, amount| {
            payment::Voucher {
                payer,
                payee,
                entry,
                cumulative_amount: amount,
                expires_at: unix_now() + 3600,
            }
            .sign(p.escrow(), &key)
            .unwrap()
        };
        assert_eq!(p.learn(p.escrow(), &[sign(elsewhere, 4_000)]), 1);
        assert_eq!(p.learn(p.escrow(), &[sign(elsewhere, 3_000)]), 0);
        let other = payment::Escrow {
            chain_id: 1,
            ..*p.escrow()
        };
        assert_eq!(p.learn(&other, &[sign(elsewhere, 9_000)]), 0);
        let here = p.node_key.node_id();
        assert_eq!(p.learn(p.escrow(), &[sign(here, 9_000)]), 0);
        // 9 000 in the escrow, 3 000 of the 4 000 signed elsewhere not yet paid: 6 000 left.
        assert!(matches!(
            p.reserve(payer, 6_001, false),
            Some(Err(Refusal::Insufficient(6_000)))
        ));
        let tab = p.open_tab(key.clone(), 1_000, 0).await.unwrap();
        tab.charge(payee, 1_000).await.unwrap();
        drop(tab);
        assert_eq!(p.spent(payer), (1_000, 4_000));
        // Both channels' latest vouchers, signatures kept, for an entry node catching up.
        let known = p.vouchers_after(None, 10);
        let amounts: Vec<u128> = known.iter().map(|s| s.voucher.cumulative_amount).collect();
        assert_eq!(known.len(), 2, "{amounts:?}");
        assert!(amounts.contains(&1_000) && amounts.contains(&4_000));
        for s in &known {
            s.verify(p.escrow()).unwrap();
        }
        let first = (
            known[0].voucher.payer,
            known[0].voucher.payee,
            known[0].voucher.entry,
        );
        assert_eq!(p.vouchers_after(Some(first), 10), known[1..].to_vec());
        let view = p.views().get(&payer).cloned().unwrap();
        assert_eq!(p.remaining(payer, &view), 5_000);
        let told = p.outgoing().await;
        assert_eq!(told.len(), 1);
        assert_eq!(
            (told[0].voucher.entry, told[0].voucher.cumulative_amount),
            (here, 1_000)
        );
    }

    /// The domain manifest's prices are the ceiling once known, whatever `payments.max_price`
    /// says; a request reserves its prompt and completion bounds each at its own price.
    #[tokio::test]
    async fn the_domain_price_bounds_what_a_request_reserves() {
        let p = payments(1000);
        assert_eq!(p.max_price(), Price::flat(1000));
        let domain = Price {
            prompt: 500,
            completion: 2_000,
        };
        p.set_domain(
            NodeId([0x0e; 20]),
            Some(Pricing {
                price: domain,
                operator_share_bps: 1_000,
            }),
        );
        assert_eq!(p.max_price(), domain);
        let key = SecretKey::generate();
        let payer = key.node_id();
        p.store(payer, view(10_000, unix_now() + 3600));
        // 2 000 prompt tokens at 0.5 and 4 000 completion tokens at 2: 9 000 reserved.
        let tab = p.open_tab(key.clone(), 2_000, 4_000).await.unwrap();
        assert_eq!(tab.reserved, 9_000);
        let refused = p.open_tab(key.clone(), 2_000, 500).await.unwrap_err();
        assert!(
            matches!(
                refused,
                PayError::Insufficient {
                    needed: 2_000,
                    remaining: 1_000,
                    ..
                }
            ),
            "{refused}"
        );
        drop(tab);
        // This node serves at its own (flat) price: 300 prompt and 200 completion tokens.
        let tab = p.open_tab(key, 300, 200).await.unwrap();
        tab.charge_here(300, 200).await.unwrap();
        assert_eq!(p.spent(payer), (500, 0));
        p.set_domain(NodeId([0x0e; 20]), None);
        assert_eq!(p.max_price(), Price::flat(1000));
    }

    #[test]
    fn unknown_and_expired_accounts_are_refused_and_stale_ones_read_again() {
        let p = payments(1000);
        let (nobody, expired, old) = (NodeId([1; 20]), NodeId([2; 20]), NodeId([3; 20]));
        // Never read: read first.
        assert!(p.reserve(nobody, 1, false).is_none());
        p.store(nobody, view(0, 0));
        assert!(matches!(
            p.reserve(nobody, 1, true),
            Some(Err(Refusal::NoAccount))
        ));
        p.store(expired, view(10, 1));
        assert!(matches!(
            p.reserve(expired, 1, true),
            Some(Err(Refusal::Expired(1)))
        ));
        // Read more than REFRESH ago: read again before anything is decided.
        let mut stale = view(10, unix_now() + 3600);
        stale.read_at = Instant::now() - REFRESH;
        p.store(old, stale);
        assert!(p.reserve(old, 1, false).is_none());
        // A refusal on a read older than RETRY is read again (a deposit may have come).
        let mut short = view(10, unix_now() + 3600);
        short.read_at = Instant::now() - RETRY;
        p.store(old, short);
        assert!(p.reserve(old, 11, false).is_none());
        assert!(matches!(
            p.reserve(old, 11, true),
            Some(Err(Refusal::Insufficient(10)))
        ));
    }

    #[test]
    fn a_flood_of_made_up_keys_does_not_grow_the_table_past_its_bound() {
        let p = payments(1000);
        let busy = NodeId([0xbb; 20]);
        p.store(busy, view(100, unix_now() + 3600));
        assert!(matches!(p.reserve(busy, 10, false), Some(Ok(_))));
        for i in 0..(MAX_VIEWS as u32 + 10) {
            let mut id = [0u8; 20];
            id[..4].copy_from_slice(&i.to_le_bytes());
            p.store(NodeId(id), view(0, 0));
        }
        let views = p.views();
        assert!(views.len() <= MAX_VIEWS, "{}", views.len());
        // What is reserved is never forgotten.
        assert_eq!(views.get(&busy).map(|v| v.reserved), Some(10));
    }
}
