//! Metering: the receipts a node signs for what it serves and checks for what it routes.
//!
//! The node that serves a request signs a [`Receipt`] (request id, domain, client, model,
//! prompt and completion tokens, its price), appends it to its `issued` ledger and returns it
//! in the stream's `Done` frame, relayed requests and its own alike. The entry node checks it
//! against what it knows of the request ([`Receipt::check`]: the signer is the node that
//! finished, the counts are those the stream reported, less what earlier nodes sent before a
//! failover) and appends it to its `received` ledger before the request ends for the client:
//! the debit is final once the receipt is on disk, and a request id counts once. Both ledgers
//! live in `<data_dir>/domain-state/<domain>/receipts/` (see [`crate::pay::ledger`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use gaia_protocol::domain::DomainId;
use gaia_protocol::hash::ContentHash;
use gaia_protocol::machine::membership::LocalService;
use gaia_protocol::payment::{Expected, Price, Receipt, ReceiptError};
use gaia_protocol::stream::RequestId;
use gaia_protocol::{NodeId, SecretKey, Signed};

use super::SwarmError;
use crate::pay::ledger::{Ledger, LedgerError, Totals};

/// A receipt the entry node does not accept.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The serving node sent none (a node of an older version, or one that could not sign).
    #[error("node {0} returned no receipt")]
    Missing(NodeId),
    /// It does not match the request.
    #[error("node {node}'s receipt is refused: {error}")]
    Refused {
        /// The serving node.
        node: NodeId,
        /// Why.
        error: ReceiptError,
    },
    /// It could not be recorded.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Counters of the receipts an entry node checked.
#[derive(Debug, Default)]
pub struct MeterCounters {
    /// Receipts accepted and recorded.
    pub accepted: AtomicU64,
    /// Receipts refused (forged, mismatched, duplicated).
    pub refused: AtomicU64,
    /// Completed requests without a receipt.
    pub missing: AtomicU64,
}

/// A node's metering: its key and offer, and its two ledgers.
#[derive(Debug)]
pub struct Meter {
    key: SecretKey,
    node: NodeId,
    domain: DomainId,
    model_hash: Option<ContentHash>,
    price: Price,
    issued: Ledger,
    received: Ledger,
    /// What the entry side saw.
    pub counters: MeterCounters,
}

impl Meter {
    /// The metering of the node with `key` in `domain`, serving `service` (none on a
    /// gateway), with its ledgers in `dir` (in memory when `None`).
    pub fn open(
        key: SecretKey,
        domain: DomainId,
        service: Option<&LocalService>,
        dir: Option<&Path>,
    ) -> Result<Self, SwarmError> {
        let open = |name: &str| match dir {
            None => Ok(Ledger::in_memory()),
            Some(dir) => {
                let path = dir.join(name);
                let (ledger, recovery) = Ledger::open(&path)
                    .map_err(|e| SwarmError::Config(format!("cannot open {name}: {e}")))?;
                tracing::info!(
                    path = %path.display(),
                    receipts = recovery.records,
                    truncated_bytes = recovery.truncated_bytes,
                    "receipt ledger opened"
                );
                Ok(ledger)
            }
        };
        Ok(Self {
            node: key.node_id(),
            key,
            domain,
            model_hash: service.map(|s| s.model_hash),
            price: service.map_or(Price::default(), |s| s.price),
            issued: open("issued.log")?,
            received: open("received.log")?,
            counters: MeterCounters::default(),
        })
    }

    /// Signs the receipt for request `id` that this node served for `client`, and records it
    /// in the `issued` ledger before returning it. `None` when it cannot be signed (a node
    /// that serves no model), which the entry node counts as a missing receipt.
    pub async fn issue(
        &self,
        id: RequestId,
        client: NodeId,
        prompt_tokens: u32,
        completion_tokens: u32,
    ) -> Option<Signed<Receipt>> {
        let receipt = Receipt {
            request_id: id,
            domain: self.domain,
            node: self.node,
            client,
            model_hash: self.model_hash?,
            prompt_tokens: u64::from(prompt_tokens),
            completion_tokens: u64::from(completion_tokens),
            prompt_price: self.price.prompt,
            timestamp: unix_now(),
            completion_price: self.price.completion,
        };
        let signed = match Signed::sign(receipt, &self.key) {
            Ok(signed) => signed,
            Err(error) => {
                tracing::error!(%error, %id, "cannot sign a receipt");
                return None;
            }
        };
        if let Err(error) = self.issued.record(&signed).await {
            // The entry node keeps its copy: the request is still paid for.
            tracing::error!(%error, %id, "cannot record an issued receipt");
        }
        Some(signed)
    }

    /// Checks the receipt `node` returned for request `id` (`served_before` tokens came from
    /// earlier nodes; the request may pay at most `max_price`) and records it
    /// in the `received` ledger. The request's debit is final when this returns `Ok`.
    #[allow(clippy::too_many_arguments)]
    pub async fn settle(
        &self,
        id: RequestId,
        node: NodeId,
        receipt: Option<&Signed<Receipt>>,
        prompt_tokens: u32,
        completion_tokens: u32,
        served_before: u32,
        max_price: Price,
    ) -> Result<(), MeterError> {
        let expected = Expected {
            request_id: id,
            domain: self.domain,
            node,
            client: self.node,
            prompt_tokens: u64::from(prompt_tokens),
            completion_tokens: u64::from(completion_tokens.saturating_sub(served_before)),
            max_price,
        };
        let result = async {
            let receipt = receipt.ok_or(MeterError::Missing(node))?;
            Receipt::check(receipt, &expected)
                .map_err(|error| MeterError::Refused { node, error })?;
            self.received.record(receipt).await?;
            Ok(())
        }
        .await;
        let counter = match &result {
            Ok(()) => &self.counters.accepted,
            Err(MeterError::Missing(_)) => &self.counters.missing,
            Err(_) => &self.counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// What this node asks.
    pub fn price(&self) -> Price {
        self.price
    }

    /// What this node's clients owe, per serving node (the `received` ledger).
    pub fn owed_by_clients(&self) -> std::collections::BTreeMap<NodeId, Totals> {
        self.received.totals()
    }

    /// What this node is owed for what it served (the `issued` ledger).
    pub fn earned(&self) -> Totals {
        self.issued
            .totals()
            .get(&self.node)
            .copied()
            .unwrap_or_default()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
