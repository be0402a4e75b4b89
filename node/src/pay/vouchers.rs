//! The voucher book: the cumulative vouchers an entry node signed with its clients' access
//! keys, the record of every debit.
//!
//! A paid request is debited by signing a new voucher for (payer, serving node, this entry
//! node) whose cumulative amount is the last one's plus the request's cost, and appending it
//! to the book's [`RecordLog`] before the request ends for the client. The book keeps the
//! latest voucher of each channel: what the payer has spent through this node is the sum of
//! their amounts, so a node that restarts (or crashes) charges nobody twice and forgets no
//! debit it acknowledged; the latest vouchers are also what `gaia pay settle` redeems. The
//! log is per escrow (`vouchers-v2-<chain id>-<contract>.log`; v2: vouchers name their entry
//! node): a voucher is bound to one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use gaia_protocol::payment::{self, SignedVoucher, Voucher, VoucherError};
use gaia_protocol::{NodeId, SecretKey};

use super::log::{LogError, RecordLog, Recovery};

/// A debit could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BookError {
    /// The voucher could not be signed.
    #[error("cannot sign the voucher: {0}")]
    Sign(String),
    /// It could not be written: the debit is not recorded.
    #[error("the voucher book: {0}")]
    Log(#[from] LogError),
}

/// A voucher's channel: (payer, payee, entry node).
type Channel = (NodeId, NodeId, NodeId);

/// The latest vouchers of an escrow's channels (see the [module documentation](self)).
#[derive(Debug)]
pub struct VoucherBook {
    escrow: payment::Escrow,
    /// The entry node whose debits this book records (this node).
    entry: NodeId,
    latest: Mutex<BTreeMap<Channel, SignedVoucher>>,
    /// Held from reading the last amount to queueing the new voucher, so that the log holds
    /// the vouchers of a pair in the order of their amounts.
    order: tokio::sync::Mutex<()>,
    log: RecordLog,
}

impl VoucherBook {
    /// A book of `entry`'s debits kept in memory only.
    pub fn in_memory(escrow: payment::Escrow, entry: NodeId) -> Self {
        Self {
            escrow,
            entry,
            latest: Mutex::default(),
            order: tokio::sync::Mutex::new(()),
            log: RecordLog::in_memory(),
        }
    }

    /// The book's file in `dir`.
    fn path(dir: &Path, escrow: &payment::Escrow) -> PathBuf {
        dir.join(format!(
            "vouchers-v2-{}-{}.log",
            escrow.chain_id, escrow.contract
        ))
    }

    /// Opens (or creates) the book of `entry`'s debits at `escrow` in `dir` and reads it back.
    /// A voucher that does not verify for this escrow is skipped.
    pub fn open(
        dir: &Path,
        escrow: payment::Escrow,
        entry: NodeId,
    ) -> Result<(Self, Recovery), LogError> {
        let path = Self::path(dir, &escrow);
        let mut latest = BTreeMap::new();
        let (log, recovery) = RecordLog::open(&path, "voucher book", |signed| {
            keep_verified(&mut latest, &escrow, &path, signed);
        })?;
        tracing::info!(
            path = %path.display(),
            vouchers = recovery.records,
            pairs = latest.len(),
            truncated_bytes = recovery.truncated_bytes,
            "voucher book opened"
        );
        Ok((
            Self {
                escrow,
                entry,
                latest: Mutex::new(latest),
                order: tokio::sync::Mutex::new(()),
                log,
            },
            recovery,
        ))
    }

    /// Reads the book of `escrow` in `dir` as it is on disk, without changing it (its node may
    /// be running): for settling. Debits go nowhere.
    pub fn read(dir: &Path, escrow: payment::Escrow) -> Result<Self, LogError> {
        let path = Self::path(dir, &escrow);
        let mut latest = BTreeMap::new();
        RecordLog::scan(&path, |signed| {
            keep_verified(&mut latest, &escrow, &path, signed);
        })?;
        Ok(Self {
            latest: Mutex::new(latest),
            ..Self::in_memory(escrow, NodeId([0; 20]))
        })
    }

    /// The escrow the vouchers are for.
    pub fn escrow(&self) -> &payment::Escrow {
        &self.escrow
    }

    /// Debits `amount` from the account of `key` for `payee`: signs the pair's next
    /// cumulative voucher (valid until `expires_at`) and returns once it is on disk. A zero
    /// amount records nothing.
    pub async fn debit(
        &self,
        key: &SecretKey,
        payee: NodeId,
        amount: u128,
        expires_at: u64,
    ) -> Result<Option<SignedVoucher>, BookError> {
        if amount == 0 {
            return Ok(None);
        }
        let payer = key.node_id();
        let (queued, signed) = {
            let _order = self.order.lock().await;
            let before = self
                .lock()
                .get(&(payer, payee, self.entry))
                .map_or(0, |v| v.voucher.cumulative_amount);
            let voucher = Voucher {
                payer,
                payee,
                entry: self.entry,
                cumulative_amount: before.saturating_add(amount),
                expires_at,
            };
            let signed = voucher
                .sign(&self.escrow, key)
                .map_err(|e: VoucherError| BookError::Sign(e.to_string()))?;
            let queued = self.log.queue(&signed).await?;
            // Counted from now on: a later voucher of the pair includes this amount even if
            // this one's write fails (the request was served).
            keep_latest(&mut self.lock(), signed);
            (queued, signed)
        };
        queued.synced().await?;
        Ok(Some(signed))
    }

    /// What `payer` has spent through this node: the latest voucher of each of its channels.
    pub fn spent(&self, payer: NodeId) -> Vec<payment::Voucher> {
        let (low, high) = (NodeId([0; 20]), NodeId([0xff; 20]));
        self.lock()
            .range((payer, low, low)..=(payer, high, high))
            .map(|(_, v)| v.voucher)
            .collect()
    }

    /// The latest voucher of every pair.
    pub fn latest(&self) -> Vec<SignedVoucher> {
        self.lock().values().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Channel, SignedVoucher>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn keep_verified(
    latest: &mut BTreeMap<Channel, SignedVoucher>,
    escrow: &payment::Escrow,
    path: &Path,
    signed: SignedVoucher,
) {
    if signed.verify(escrow).is_err() {
        tracing::warn!(path = %path.display(), "a voucher in the book does not verify: skipped");
        return;
    }
    keep_latest(latest, signed);
}

fn keep_latest(latest: &mut BTreeMap<Channel, SignedVoucher>, signed: SignedVoucher) {
    let v = signed.voucher;
    let slot = latest.entry((v.payer, v.payee, v.entry)).or_insert(signed);
    if slot.voucher.cumulative_amount < v.cumulative_amount {
        *slot = signed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SecretKey {
        let mut bytes = [seed.clamp(1, 0x7f); 32];
        bytes[31] = 0x35;
        SecretKey::from_bytes(&bytes).expect("a valid key")
    }

    const ENTRY: NodeId = NodeId([0xe7; 20]);

    fn amounts(book: &VoucherBook, payer: NodeId) -> Vec<(NodeId, u128)> {
        book.spent(payer)
            .iter()
            .map(|v| {
                assert_eq!(v.entry, ENTRY);
                (v.payee, v.cumulative_amount)
            })
            .collect()
    }

    fn escrow() -> payment::Escrow {
        payment::Escrow {
            chain_id: 1337,
            contract: NodeId([0xec; 20]),
        }
    }

    #[tokio::test]
    async fn debits_add_up_per_pair_survive_a_reopen_and_verify_on_chain_terms() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob) = (key(1), key(2));
        let (p, q) = (NodeId([1; 20]), NodeId([2; 20]));
        {
            let (book, recovery) = VoucherBook::open(dir.path(), escrow(), ENTRY).unwrap();
            assert_eq!(recovery.records, 0);
            book.debit(&alice, p, 100, 99).await.unwrap();
            book.debit(&alice, p, 50, 99).await.unwrap();
            book.debit(&alice, q, 7, 99).await.unwrap();
            assert_eq!(book.debit(&bob, p, 0, 99).await.unwrap(), None);
            let last = book.debit(&bob, p, 1, 99).await.unwrap().unwrap();
            assert_eq!(last.verify(&escrow()).unwrap().cumulative_amount, 1);
        }
        let (book, recovery) = VoucherBook::open(dir.path(), escrow(), ENTRY).unwrap();
        assert_eq!(recovery.records, 4);
        assert_eq!(amounts(&book, alice.node_id()), vec![(p, 150), (q, 7)]);
        assert_eq!(amounts(&book, bob.node_id()), vec![(p, 1)]);
        // The next debit goes on from the book read back.
        let next = book.debit(&alice, p, 1, 99).await.unwrap().unwrap();
        assert_eq!(next.voucher.cumulative_amount, 151);
        // Another escrow keeps another book.
        let other = payment::Escrow {
            chain_id: 1,
            ..escrow()
        };
        let (book, _) = VoucherBook::open(dir.path(), other, ENTRY).unwrap();
        assert!(book.latest().is_empty());
    }

    #[tokio::test]
    async fn concurrent_debits_of_one_pair_are_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let alice = key(1);
        let p = NodeId([1; 20]);
        let (book, _) = VoucherBook::open(dir.path(), escrow(), ENTRY).unwrap();
        let book = std::sync::Arc::new(book);
        let tasks: Vec<_> = (1..=50u128)
            .map(|amount| {
                let (book, alice) = (book.clone(), alice.clone());
                tokio::spawn(async move { book.debit(&alice, p, amount, 99).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        drop(book);
        let (book, recovery) = VoucherBook::open(dir.path(), escrow(), ENTRY).unwrap();
        assert_eq!(recovery.records, 50);
        assert_eq!(amounts(&book, alice.node_id()), vec![(p, (1..=50).sum())]);
    }
}
