//! Receipts on disk: an append-only log that a receipt reaches, synced, before the debit it
//! stands for is final.
//!
//! A node keeps two: the receipts it signed for the requests it served (what it is owed) and
//! the receipts the nodes that served its clients returned (what its clients owe). Each
//! record is `length (u32 LE) | CRC-32 of the bytes (u32 LE) | a signed receipt (bincode)`.
//! Appends are batched: one writer thread writes every record queued meanwhile and syncs the
//! file once for all of them (group commit), so a busy node pays one `fdatasync` per batch,
//! not per request, and [`Ledger::record`] returns only once its record is on disk.
//!
//! Opening a log reads it back: a record cut short or garbled (a crash in the middle of an
//! append) ends the log there, and the file is truncated to the last whole record, which
//! loses nothing that was acknowledged (an acknowledged record was synced whole). Request ids
//! already in the log are refused ([`LedgerError::Duplicate`]): a receipt counts once.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gaia_protocol::payment::{MAX_RECEIPT_BYTES, Receipt};
use gaia_protocol::stream::RequestId;
use gaia_protocol::{NodeId, Signed, Wire};
use tokio::sync::{mpsc, oneshot};

/// The most records one sync covers.
const MAX_BATCH: usize = 1024;
/// How many appends may wait for the writer.
const QUEUE: usize = 4096;
/// A record's header: length and CRC.
const HEADER: usize = 8;

/// A receipt could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// A receipt for this request is already in the ledger.
    #[error("a receipt for request {0} is already recorded")]
    Duplicate(RequestId),
    /// The file could not be written or synced; the receipt is not recorded.
    #[error("the receipt ledger {path}: {message}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The receipt does not encode within the record limit (it is not recorded).
    #[error("cannot encode the receipt: {0}")]
    Encode(String),
    /// The writer stopped (the node is shutting down).
    #[error("the receipt ledger is closed")]
    Closed,
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

/// What opening a log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Whole records read back.
    pub records: u64,
    /// Bytes of a torn or garbled tail cut off (0 after a clean shutdown).
    pub truncated_bytes: u64,
}

#[derive(Debug, Default)]
struct Book {
    ids: HashSet<RequestId>,
    totals: BTreeMap<NodeId, Totals>,
}

struct Append {
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), LedgerError>>,
}

/// An append-only, crash-safe log of signed receipts (see the [module documentation](self)).
#[derive(Debug, Clone)]
pub struct Ledger {
    book: Arc<Mutex<Book>>,
    /// `None`: kept in memory only (a node without a data directory, and tests).
    writer: Option<mpsc::Sender<Append>>,
}

impl Ledger {
    /// A ledger that keeps receipts in memory only.
    pub fn in_memory() -> Self {
        Self {
            book: Arc::default(),
            writer: None,
        }
    }

    /// Opens (or creates) the log at `path`, reads it back, cuts a torn tail, and starts its
    /// writer thread.
    pub fn open(path: &Path) -> Result<(Self, Recovery), LedgerError> {
        let io = |e: std::io::Error| LedgerError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut book = Book::default();
        let (records, good) = read_records(std::io::BufReader::new(&mut file), |receipt| {
            book.ids.insert(receipt.request_id);
            book.totals.entry(receipt.node).or_default().add(receipt);
        })
        .map_err(io)?;
        let truncated_bytes = size.saturating_sub(good);
        if truncated_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = truncated_bytes,
                kept = records,
                "the receipt ledger ends in a torn or garbled record (a crash while appending): \
                 cutting it off"
            );
            file.set_len(good).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let owned = path.to_path_buf();
        std::thread::Builder::new()
            .name("gaia-ledger".into())
            .spawn(move || write_loop(file, &owned, rx))
            .map_err(io)?;
        let ledger = Self {
            book: Arc::new(Mutex::new(book)),
            writer: Some(tx),
        };
        Ok((
            ledger,
            Recovery {
                records,
                truncated_bytes,
            },
        ))
    }

    /// Appends `receipt` (already checked) and returns once it is on disk. A request id
    /// already recorded is refused; a failed write records nothing.
    pub async fn record(&self, receipt: &Signed<Receipt>) -> Result<(), LedgerError> {
        let id = receipt.payload.request_id;
        if !self.lock().ids.insert(id) {
            return Err(LedgerError::Duplicate(id));
        }
        let written = match &self.writer {
            None => Ok(()),
            Some(writer) => self.append(writer, receipt).await,
        };
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
                Err(error)
            }
        }
    }

    async fn append(
        &self,
        writer: &mpsc::Sender<Append>,
        receipt: &Signed<Receipt>,
    ) -> Result<(), LedgerError> {
        let body = receipt
            .to_bytes()
            .map_err(|e| LedgerError::Encode(e.to_string()))?;
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        // A signed receipt is below MAX_RECEIPT_BYTES, which `to_bytes` enforces.
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let (done, wait) = oneshot::channel();
        writer
            .send(Append { bytes, done })
            .await
            .map_err(|_| LedgerError::Closed)?;
        wait.await.map_err(|_| LedgerError::Closed)?
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

/// Reads whole, intact records from the start of `input` (one record in memory at a time),
/// passing each receipt to `each`; returns how many and the length they cover (the rest is a
/// torn or garbled tail).
fn read_records(
    mut input: impl std::io::Read,
    mut each: impl FnMut(&Receipt),
) -> std::io::Result<(u64, u64)> {
    let mut at = 0u64;
    let mut records = 0;
    let mut body = [0u8; MAX_RECEIPT_BYTES];
    loop {
        let mut header = [0u8; HEADER];
        match input.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = body.get_mut(..len) else {
            break;
        };
        match input.read_exact(body) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if crc32fast::hash(body) != crc {
            break;
        }
        let Ok(receipt) = Signed::<Receipt>::from_bytes(body) else {
            break;
        };
        each(&receipt.payload);
        records += 1;
        at += (HEADER + len) as u64;
    }
    Ok((records, at))
}

/// The writer thread: appends every queued record, syncs once, acknowledges them all.
fn write_loop(mut file: File, path: &Path, mut rx: mpsc::Receiver<Append>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut bytes = Vec::with_capacity(batch.iter().map(|a| a.bytes.len()).sum());
        for append in &batch {
            bytes.extend_from_slice(&append.bytes);
        }
        let result = file
            .write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(|e| LedgerError::Io {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        if let Err(error) = &result {
            tracing::error!(%error, "cannot append to the receipt ledger");
            // A partial write would leave a torn record before the next ones: cut it off.
            if let Ok(len) = file.metadata().map(|m| m.len())
                && let Some(before) = len.checked_sub(bytes.len() as u64)
            {
                let _ = file.set_len(before);
            }
        }
        for append in batch.drain(..) {
            let _ = append.done.send(result.clone());
        }
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
            price: 1000,
            timestamp: 1_700_000_000,
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
