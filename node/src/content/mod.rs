//! Content by hash: a member seeds the model files and knowledge-base snapshot it advertises,
//! and a node that joins a domain with nothing fetches what the manifest requires from the
//! members that hold it (`/gaia/content/1.0.0`, [`gaia_protocol::content`]).
//!
//! - [`seed`]: the seeder. It answers content streams from members of its domain, for the
//!   content it advertises only (its chat model, its embedding model, its knowledge base's
//!   current snapshot), within the operator's limits ([`ContentConfig`]: whether to seed,
//!   what, how many uploads at once, how many bytes per second).
//! - [`fetch`]: the fetcher. It asks every seeder for a descriptor, takes the one most of them
//!   agree on, and then keeps a window of chunk requests in flight on each seeder's stream.
//!   Every chunk is checked against its digest on arrival; a seeder that sends a bad one is
//!   penalised and no longer asked, one that dies or stalls hands its chunks back to the
//!   others. Chunks land at their offset in a partial file under `<data dir>/downloads/`, so
//!   an interrupted fetch resumes with what is there (each chunk re-checked). The whole file
//!   is checked against its sha256 at the end.
//! - [`join`]: what a domain requires and where it is: the store is searched by hash first,
//!   then the members that advertise it are asked. `gaia start --domain` on an empty data
//!   directory fetches before it loads, and `gaia models pull --from-domain` fetches alone.
//!
//! Streams are generic over `AsyncRead + AsyncWrite`, so the unit tests run seeders and
//! fetchers over in-memory pipes.

pub mod fetch;
pub mod join;
pub mod seed;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use gaia_protocol::Wire;
use gaia_protocol::codec::FrameError;

use crate::swarm::codec::read_body;
use gaia_protocol::content::{
    ContentRequest, ContentResponse, MAX_REQUEST_BYTES, MAX_RESPONSE_FRAME,
};
use serde::{Deserialize, Serialize};

/// `[content]`: what this node seeds to its domain, and how much.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContentConfig {
    /// Hand the content this node advertises to members that fetch it. Default true.
    pub seed: bool,
    /// What to hand out: any of `chat`, `embedding` and `kb`. Default all three.
    pub share: Vec<String>,
    /// Upload bandwidth for all fetchers together, in bytes per second; 0: no limit.
    pub upload_bytes_per_s: u64,
    /// Upload bandwidth to any one peer, in bytes per second; 0: no limit of its own.
    pub upload_bytes_per_s_per_peer: u64,
    /// Fetchers served at once (one stream each); more are told to come back later.
    /// Default 8.
    pub max_uploads: usize,
    /// Streams one peer may hold at once. Default 2.
    pub max_uploads_per_peer: usize,
}

impl Default for ContentConfig {
    fn default() -> Self {
        Self {
            seed: true,
            share: SHARE_KINDS.iter().map(|s| s.to_string()).collect(),
            upload_bytes_per_s: 0,
            upload_bytes_per_s_per_peer: 0,
            max_uploads: 8,
            max_uploads_per_peer: 2,
        }
    }
}

/// The values `content.share` takes.
pub const SHARE_KINDS: [&str; 3] = ["chat", "embedding", "kb"];

impl ContentConfig {
    /// Checks the values; the error names the key.
    pub fn check(&self) -> Result<(), String> {
        for kind in &self.share {
            if !SHARE_KINDS.contains(&kind.as_str()) {
                return Err(format!(
                    "content.share: {kind:?} is not one of {}",
                    SHARE_KINDS.join(", ")
                ));
            }
        }
        if self.max_uploads == 0 || self.max_uploads > 1024 {
            return Err("content.max_uploads must be between 1 and 1024".into());
        }
        if self.max_uploads_per_peer == 0 {
            return Err("content.max_uploads_per_peer must be at least 1".into());
        }
        Ok(())
    }

    /// Whether this node hands out content of `kind` (`chat`, `embedding`, `kb`).
    pub fn shares(&self, kind: &str) -> bool {
        self.seed && self.share.iter().any(|k| k == kind)
    }
}

/// Writes one frame (a big-endian length, then `body`); does not flush.
pub(crate) async fn write_body<W: AsyncWrite + Unpin>(
    io: &mut W,
    body: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(body).await
}

/// Reads the next request; `Ok(None)` on a clean end of stream.
pub(crate) async fn read_request<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<ContentRequest>, String> {
    match read_body(io, MAX_REQUEST_BYTES).await {
        Ok(None) => Ok(None),
        Ok(Some(body)) => ContentRequest::from_bytes(&body)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads the next response; an end of stream is an error here (a response was due).
pub(crate) async fn read_response<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<ContentResponse, ReadError> {
    match read_body(io, MAX_RESPONSE_FRAME).await {
        Ok(None) => Err(ReadError::Closed),
        Ok(Some(body)) => {
            ContentResponse::decode(&body).map_err(|e| ReadError::Malformed(e.to_string()))
        }
        Err(FrameError::Truncated { .. }) => Err(ReadError::Closed),
        Err(e) => Err(ReadError::Malformed(e.to_string())),
    }
}

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// The stream ended or broke (the seeder left).
    Closed,
    /// The seeder sent bytes that are not a response (a protocol violation).
    Malformed(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed => f.write_str("the stream closed"),
            ReadError::Malformed(why) => write!(f, "a malformed response: {why}"),
        }
    }
}

/// A token bucket: `take(n)` waits until `n` bytes fit in the rate. Shared by every upload of
/// a node, so `content.upload_bytes_per_s` bounds them together.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_s: u64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// A limit of `bytes_per_s` (0: none).
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Waits until `bytes` more may be sent.
    pub async fn take(&self, bytes: usize) {
        if self.bytes_per_s == 0 {
            return;
        }
        let rate = self.bytes_per_s as f64;
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // A burst of one second at most.
            let refill = now.duration_since(state.1).as_secs_f64() * rate;
            state.0 = (state.0 + refill).min(rate);
            state.1 = now;
            state.0 -= bytes as f64;
            (state.0 < 0.0).then(|| Duration::from_secs_f64(-state.0 / rate))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_rate_limit_spaces_bytes_out() {
        let limit = RateLimit::new(1_000_000);
        let start = Instant::now();
        for _ in 0..5 {
            limit.take(500_000).await;
        }
        // 2.5 MB at 1 MB/s, the first second's worth borrowed: at least 2 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        let unlimited = RateLimit::new(0);
        let start = Instant::now();
        unlimited.take(usize::MAX).await;
        assert!(start.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn the_config_names_bad_keys() {
        let mut c = ContentConfig::default();
        c.check().unwrap();
        assert!(c.shares("kb"));
        c.share = vec!["weights".into()];
        assert!(c.check().unwrap_err().contains("content.share"));
        let c = ContentConfig {
            max_uploads: 0,
            ..ContentConfig::default()
        };
        assert!(c.check().unwrap_err().contains("max_uploads"));
        let c = ContentConfig {
            seed: false,
            ..ContentConfig::default()
        };
        assert!(!c.shares("chat"));
    }
}
