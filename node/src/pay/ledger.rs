//! Receipts on disk: a [`RecordLog`] that a receipt reaches, synced, before the debit it
//! stands for is final.
//!
//! A node keeps two: the receipts it signed for the requests it served (what it is owed) and
//! the receipts the nodes that served its clients returned (what its clients owe). Appends are
//! group-committed and a torn tail is cut on opening (see [`super::log`]); [`Ledger::record`]
//! returns only once its receipt is on disk. Request ids already in the log are refused
//! ([`LedgerError::Duplicate`]): a receipt counts once.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use gaia_protocol::payment::Receipt;
use gaia_protocol::stream::RequestId;
use gaia_protocol::{NodeId, Signed};

pub use super::log::Recovery;
use super::log::{LogError, RecordLog};

/// A receipt could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// A receipt for this request is already in the ledger.
    #[error("a receipt for request {0} is already recorded")]
    Duplicate(RequestId),
    /// It could not be written (the receipt is not recorded).
    #[error("the receipt ledger: {0}")]
    Log(#[from] LogError),
}

/// What a ledger holds for one serving node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Receipts.
    pub receipts: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// The amount owed, in the smallest unit of the domain's currency.
    pub amount: u128,
}

impl Totals {
    fn add(&mut self, receipt: &Receipt) {
        self.receipts = self.receipts.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(receipt.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(receipt.completion_tokens);
        self.amount = self.amount.saturating_add(receipt.amount());
    }
}

#[derive(Debug, Default)]
struct Book {
    ids: HashSet<RequestId>,
    totals: BTreeMap<NodeId, Totals>,
}

/// An append-only, crash-safe log of signed receipts (see the [module documentation](self)).
#[derive(Debug, Clone)]
pub struct Ledger {
    book: Arc<Mutex<Book>>,
    log: RecordLog,
}

impl Ledger {
    /// A ledger that keeps receipts in memory only.
    pub fn in_memory() -> Self {
        Self {
            book: Arc::default(),
            log: RecordLog::in_memory(),
        }
    }

    /// Opens (or creates) the ledger at `path` and reads it back.
    pub fn open(path: &Path) -> Result<(Self, Recovery), LedgerError> {
        let mut book = Book::default();
        let (log, recovery) =
            RecordLog::open(path, "receipt ledger", |receipt: Signed<Receipt>| {
                book.ids.insert(receipt.payload.request_id);
                book.totals
                    .entry(receipt.payload.node)
                    .or_default()
                    .add(&receipt.payload);
            })?;
        let ledger = Self {
            book: Arc::new(Mutex::new(book)),
            log,
        };
        Ok((ledger, recovery))
    }

    /// Appends `receipt` (already checked) and returns once it is on disk. A request id
    /// already recorded is refused; a failed write records nothing.
    pub async fn record(&self, receipt: &Signed<Receipt>) -> Result<(), LedgerError> {
        let id = receipt.payload.request_id;
        if !self.lock().ids.insert(id) {
            return Err(LedgerError::Duplicate(id));
        }
        let written = self.log.append(receipt).await;
        let mut book = self.lock();
        match written {
            Ok(()) => {
                book.totals
                    .entry(receipt.payload.node)
                    .or_default()
                    .add(&receipt.payload);
                Ok(())
            }
            Err(error) => {
                book.ids.remove(&id);
                Err(error.into())
            }
        }
    }

    /// The totals per serving node.
    pub fn totals(&self) -> BTreeMap<NodeId, Totals> {
        self.lock().totals.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        // A panic while holding the lock leaves plain counters behind: keep going.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gaia_protocol::SecretKey;
    use gaia_protocol::domain::DomainId;
    use gaia_protocol::hash::ContentHash;

    fn key(seed: u8) -> SecretKey {
        let mut bytes = [seed.clamp(1, 0x7f); 32];
        bytes[31] = 0x33;
        SecretKey::from_bytes(&bytes).expect("a valid key")
    }

    fn receipt(node: &SecretKey, id: u8, completion: u64) -> Signed<Receipt> {
        let receipt = Receipt {
            request_id: RequestId([id; 16]),
            domain: DomainId([1; 32]),
            node: node.node_id(),
            client: key(9).node_id(),
            model_hash: ContentHash::of(b"model"),
            prompt_tokens: 10,
            completion_tokens: completion,
            prompt_price: 1000,
            timestamp: 1_700_000_000,
            completion_price: 1000,
        };
        Signed::sign(receipt, node).expect("sign")
    }

    #[tokio::test]
    async fn receipts_survive_a_reopen_and_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receipts").join("received.log");
        let (a, b) = (key(1), key(2));
        {
            let (ledger, recovery) = Ledger::open(&path).unwrap();
            assert_eq!(recovery, Recovery::default());
            ledger.record(&receipt(&a, 1, 5)).await.unwrap();
            ledger.record(&receipt(&a, 2, 7)).await.unwrap();
            ledger.record(&receipt(&b, 3, 1)).await.unwrap();
            assert!(matches!(
                ledger.record(&receipt(&b, 1, 1)).await,
                Err(LedgerError::Duplicate(_))
            ));
        }
        let (ledger, recovery) = Ledger::open(&path).unwrap();
        assert_eq!(recovery.records, 3);
        assert_eq!(recovery.truncated_bytes, 0);
        let totals = ledger.totals();
        assert_eq!(
            totals[&a.node_id()],
            Totals {
                receipts: 2,
                prompt_tokens: 20,
                completion_tokens: 12,
                amount: 32,
            }
        );
        assert_eq!(totals[&b.node_id()].receipts, 1);
        // Read back, a request id still counts once.
        assert!(matches!(
            ledger.record(&receipt(&b, 2, 1)).await,
            Err(LedgerError::Duplicate(_))
        ));
    }

    #[tokio::test]
    async fn a_torn_or_garbled_tail_is_cut_and_the_whole_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("received.log");
        let a = key(1);
        {
            let (ledger, _) = Ledger::open(&path).unwrap();
            for id in 1..=3 {
                ledger.record(&receipt(&a, id, 1)).await.unwrap();
            }
        }
        let whole = std::fs::read(&path).unwrap();
        let one = whole.len() / 3;
        // A crash in the middle of the fourth append: half a record at the end.
        let torn = [&whole[..], &whole[..one / 2]].concat();
        std::fs::write(&path, &torn).unwrap();
        let (ledger, recovery) = Ledger::open(&path).unwrap();
        assert_eq!(recovery.records, 3);
        assert_eq!(recovery.truncated_bytes, (one / 2) as u64);
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        // Appends after the cut land where the torn record was.
        ledger.record(&receipt(&a, 4, 1)).await.unwrap();
        drop(ledger);
        let (ledger, recovery) = Ledger::open(&path).unwrap();
        assert_eq!((recovery.records, recovery.truncated_bytes), (4, 0));
        assert_eq!(ledger.totals()[&a.node_id()].receipts, 4);
        drop(ledger);

        // A flipped bit in the last record: the CRC catches it.
        let mut garbled = std::fs::read(&path).unwrap();
        let last = garbled.len() - 3;
        garbled[last] ^= 0x40;
        std::fs::write(&path, &garbled).unwrap();
        let (_, recovery) = Ledger::open(&path).unwrap();
        assert_eq!(recovery.records, 3);
        assert_eq!(recovery.truncated_bytes, one as u64);
        // A length field beyond any receipt is garbage, not an allocation.
        let mut huge = std::fs::read(&path).unwrap();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 12]);
        std::fs::write(&path, &huge).unwrap();
        let (_, recovery) = Ledger::open(&path).unwrap();
        assert_eq!((recovery.records, recovery.truncated_bytes), (3, 16));
    }

    #[tokio::test]
    async fn concurrent_appends_share_syncs_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issued.log");
        let a = key(1);
        let (ledger, _) = Ledger::open(&path).unwrap();
        let tasks: Vec<_> = (0..200u8)
            .map(|i| {
                let ledger = ledger.clone();
                let signed = receipt(&a, i, u64::from(i));
                tokio::spawn(async move { ledger.record(&signed).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        drop(ledger);
        let (ledger, recovery) = Ledger::open(&path).unwrap();
        assert_eq!(recovery.records, 200);
        assert_eq!(
            ledger.totals()[&a.node_id()].completion_tokens,
            (0..200u64).sum::<u64>()
        );
    }
}
