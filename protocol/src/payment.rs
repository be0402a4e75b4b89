//! Metering: receipts signed by the serving node, vouchers signed by the paying client.
//!
//! A [`Receipt`] is the serving node's signed statement of the tokens it produced for one
//! request at its advertised price; the client (or the domain operator) can check it and sum
//! receipts for settlement. A [`Voucher`] is the client's signed, cumulative promise to pay a
//! node out of its escrow: each new voucher for the same channel supersedes the previous one
//! with a higher `cumulative_amount`, so the node only ever needs to keep (and redeem) the last.

use serde::{Deserialize, Serialize};

use crate::codec::impl_wire;
use crate::domain::DomainId;
use crate::hash::ContentHash;
use crate::identity::NodeId;
use crate::signature::MessageKind;
use crate::signed::{Signable, Signed};
use crate::stream::RequestId;
use crate::validate::{self, Validate, ValidationError};

/// The largest encoded (signed) receipt or voucher.
pub const MAX_RECEIPT_BYTES: usize = 512;

/// The serving node's signed account of one completed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The request.
    pub request_id: RequestId,
    /// The domain it was served in.
    pub domain: DomainId,
    /// The serving node; must be the signer.
    pub node: NodeId,
    /// The node that sent the request (the entry node, for API clients without a key).
    pub client: NodeId,
    /// The model file that served it.
    pub model_hash: ContentHash,
    /// Prompt tokens processed.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Price per 1000 tokens, in the smallest unit.
    pub price: u64,
    /// When the request completed (unix seconds).
    pub timestamp: u64,
}

impl Receipt {
    /// The amount owed: `ceil((prompt + completion) * price / 1000)`, exact in `u128`.
    pub fn amount(&self) -> u128 {
        let tokens = u128::from(self.prompt_tokens) + u128::from(self.completion_tokens);
        (tokens * u128::from(self.price)).div_ceil(1000)
    }
}

impl Validate for Receipt {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

impl Signable for Receipt {
    const KIND: MessageKind = MessageKind::Receipt;
    const NAME: &'static str = "receipt";

    fn author(&self) -> Option<NodeId> {
        Some(self.node)
    }
}

/// The client's signed, cumulative promise to pay `payee` from its escrow in `domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    /// The domain whose escrow pays.
    pub domain: DomainId,
    /// The paying client; must be the signer.
    pub client: NodeId,
    /// The node being paid.
    pub payee: NodeId,
    /// The payment channel between them.
    pub channel: u64,
    /// The total owed on this channel so far, in the smallest unit (never decreases).
    pub cumulative_amount: u64,
    /// When it was issued (unix seconds).
    pub issued_at: u64,
    /// When it can no longer be redeemed (unix seconds).
    pub expires_at: u64,
}

impl Validate for Voucher {
    fn validate(&self) -> Result<(), ValidationError> {
        validate::strictly_after(
            "voucher.issued_at",
            self.issued_at,
            "voucher.expires_at",
            self.expires_at,
        )
    }
}

impl Signable for Voucher {
    const KIND: MessageKind = MessageKind::Voucher;
    const NAME: &'static str = "voucher";

    fn author(&self) -> Option<NodeId> {
        Some(self.client)
    }
}

impl_wire!(Receipt, "receipt", MAX_RECEIPT_BYTES);
impl_wire!(Signed<Receipt>, "signed receipt", MAX_RECEIPT_BYTES);
impl_wire!(Voucher, "voucher", MAX_RECEIPT_BYTES);
impl_wire!(Signed<Voucher>, "signed voucher", MAX_RECEIPT_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Wire;
    use crate::test_utils::{key, sample_receipt};

    #[test]
    fn amount_rounds_up_and_never_overflows() {
        let mut receipt = sample_receipt(&key(1), key(2).node_id(), DomainId([1; 32]));
        assert_eq!(receipt.amount(), 2); // 200 tokens * 10 / 1000
        receipt.prompt_tokens = 1;
        receipt.completion_tokens = 0;
        assert_eq!(receipt.amount(), 1);
        receipt.prompt_tokens = u64::MAX;
        receipt.completion_tokens = u64::MAX;
        receipt.price = u64::MAX;
        assert!(receipt.amount() > u128::from(u64::MAX));
        receipt.price = 0;
        assert_eq!(receipt.amount(), 0);
    }

    #[test]
    fn receipts_are_signed_by_the_serving_node() {
        let node = key(1);
        let receipt = sample_receipt(&node, key(2).node_id(), DomainId([1; 32]));
        let signed = Signed::sign(receipt.clone(), &node).unwrap();
        let back = Signed::<Receipt>::from_bytes(&signed.to_bytes().unwrap()).unwrap();
        assert_eq!(back.verify().unwrap(), &receipt);
        assert!(Signed::sign(receipt, &key(2)).is_err());
    }

    #[test]
    fn vouchers_are_signed_by_the_client_and_ordered_in_time() {
        let client = key(2);
        let voucher = Voucher {
            domain: DomainId([1; 32]),
            client: client.node_id(),
            payee: key(1).node_id(),
            channel: 7,
            cumulative_amount: 1_000,
            issued_at: 100,
            expires_at: 200,
        };
        let signed = Signed::sign(voucher.clone(), &client).unwrap();
        signed.verify().unwrap();
        assert!(Signed::sign(voucher.clone(), &key(1)).is_err());
        let expired = Voucher {
            expires_at: 100,
            ..voucher
        };
        assert!(expired.validate().is_err());
    }
}
