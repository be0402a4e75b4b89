//! An append-only, crash-safe log of small wire values: what the receipt ledgers
//! ([`super::ledger`]) and the voucher book ([`super::vouchers`]) are written in.
//!
//! Each record is `length (u32 LE) | CRC-32 of the bytes (u32 LE) | the value (its wire
//! encoding, at most [`MAX_RECORD`] bytes)`. Appends are batched: one writer thread writes
//! every record queued meanwhile and syncs the file once for all of them (group commit), so a
//! busy node pays one `fdatasync` per batch, not per record, and an append is acknowledged
//! only once its record is on disk. Records reach the file in the order they were queued.
//!
//! Opening a log reads it back: a record cut short or garbled (a crash in the middle of an
//! append) ends the log there, and the file is truncated to the last whole record, which
//! loses nothing that was acknowledged (an acknowledged record was synced whole).

use std::fs::{File, OpenOptions};
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use gaia_protocol::Wire;
use gaia_protocol::payment::MAX_RECEIPT_BYTES;
use tokio::sync::{mpsc, oneshot};

/// The largest record body: a signed receipt or voucher.
pub const MAX_RECORD: usize = MAX_RECEIPT_BYTES;
/// The most records one sync covers.
const MAX_BATCH: usize = 1024;
/// How many appends may wait for the writer.
const QUEUE: usize = 4096;
/// A record's header: length and CRC.
const HEADER: usize = 8;

/// A record could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The file could not be written or synced; the record is not in the log.
    #[error("{path}: {message}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The value does not encode within the record limit (it is not written).
    #[error("cannot encode the record: {0}")]
    Encode(String),
    /// The writer stopped (the node is shutting down).
    #[error("the log is closed")]
    Closed,
}

/// What opening a log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Whole records read back.
    pub records: u64,
    /// Bytes of a torn or garbled tail cut off (0 after a clean shutdown).
    pub truncated_bytes: u64,
}

struct Append {
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), LogError>>,
}

/// The writing end of a log (see the [module documentation](self)); clones share the file.
#[derive(Debug, Clone)]
pub struct RecordLog {
    /// `None`: kept in memory only (a node without a data directory, and tests).
    writer: Option<mpsc::Sender<Append>>,
}

/// A queued append: wait on it for the record to be on disk.
pub struct Queued(Option<oneshot::Receiver<Result<(), LogError>>>);

impl Queued {
    /// Returns once the record is synced (or failed to be).
    pub async fn synced(self) -> Result<(), LogError> {
        match self.0 {
            None => Ok(()),
            Some(wait) => wait.await.map_err(|_| LogError::Closed)?,
        }
    }
}

impl RecordLog {
    /// A log that keeps nothing (its owner keeps its state in memory only).
    pub fn in_memory() -> Self {
        Self { writer: None }
    }

    /// Opens (or creates) the log at `path`, passes each whole record read back to `each`,
    /// cuts a torn tail, and starts its writer thread. `what` names the log in messages.
    pub fn open<T: Wire>(
        path: &Path,
        what: &str,
        mut each: impl FnMut(T),
    ) -> Result<(Self, Recovery), LogError> {
        let io = |e: std::io::Error| LogError::Io {
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
        let (records, good) =
            read_records(std::io::BufReader::new(&mut file), &mut each).map_err(io)?;
        let truncated_bytes = size.saturating_sub(good);
        if truncated_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = truncated_bytes,
                kept = records,
                "the {what} ends in a torn or garbled record (a crash while appending): \
                 cutting it off"
            );
            file.set_len(good).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let owned = path.to_path_buf();
        std::thread::Builder::new()
            .name("gaia-log".into())
            .spawn(move || write_loop(file, &owned, rx))
            .map_err(io)?;
        Ok((
            Self { writer: Some(tx) },
            Recovery {
                records,
                truncated_bytes,
            },
        ))
    }

    /// Reads the log at `path` without changing it (another process may be appending to
    /// it): passes each whole record to `each`; a missing file holds none.
    pub fn scan<T: Wire>(path: &Path, mut each: impl FnMut(T)) -> Result<Recovery, LogError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovery::default()),
            Err(e) => {
                return Err(LogError::Io {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                });
            }
        };
        let (records, _) =
            read_records(std::io::BufReader::new(file), &mut each).map_err(|e| LogError::Io {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Recovery {
            records,
            truncated_bytes: 0,
        })
    }

    /// Queues `value` for appending: records are written in the order they were queued.
    pub async fn queue<T: Wire>(&self, value: &T) -> Result<Queued, LogError> {
        let Some(writer) = &self.writer else {
            return Ok(Queued(None));
        };
        let body = value
            .to_bytes()
            .map_err(|e| LogError::Encode(e.to_string()))?;
        if body.len() > MAX_RECORD {
            return Err(LogError::Encode(format!(
                "{} bytes is above the record limit of {MAX_RECORD}",
                body.len()
            )));
        }
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let (done, wait) = oneshot::channel();
        writer
            .send(Append { bytes, done })
            .await
            .map_err(|_| LogError::Closed)?;
        Ok(Queued(Some(wait)))
    }

    /// Appends `value` and returns once it is on disk.
    pub async fn append<T: Wire>(&self, value: &T) -> Result<(), LogError> {
        self.queue(value).await?.synced().await
    }
}

/// Reads whole, intact records from the start of `input` (one record in memory at a time),
/// passing each value to `each`; returns how many and the length they cover (the rest is a
/// torn or garbled tail).
fn read_records<T: Wire>(
    mut input: impl std::io::Read,
    each: &mut impl FnMut(T),
) -> std::io::Result<(u64, u64)> {
    let mut at = 0u64;
    let mut records = 0;
    let mut body = [0u8; MAX_RECORD];
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
        let Ok(value) = T::from_bytes(body) else {
            break;
        };
        each(value);
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
            .map_err(|e| LogError::Io {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        if let Err(error) = &result {
            tracing::error!(%error, "cannot append to a log");
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
