//! Metering: receipts signed by the serving node, vouchers signed by the paying account.
//!
//! A [`Receipt`] is the serving node's signed statement of the tokens it produced for one
//! request at its advertised price; the entry node checks it and sums receipts for
//! settlement. A [`Voucher`] is the paying account's signed, cumulative promise to pay a node
//! out of the domain's escrow contract: EIP-712 typed data ABI-encoded the way the contract
//! (protocol/contracts/GaiaEscrow.sol) hashes it, so the contract can check the signature, and
//! bound to one chain and one contract ([`Escrow`]). Each new voucher of the same channel
//! (payer, payee, entry node) supersedes the previous one with a higher `cumulative_amount`,
//! so a node only ever needs to keep (and redeem) the last.

use serde::{Deserialize, Serialize};
use sha3::{Digest as _, Keccak256};

use crate::codec::impl_wire;
use crate::domain::DomainId;
use crate::hash::ContentHash;
use crate::identity::NodeId;
use crate::identity::SecretKey;
use crate::signature::{self, MessageKind, Signature, SignatureError};
use crate::signed::{Signable, Signed};
use crate::stream::RequestId;
use crate::validate::{Validate, ValidationError};

/// The largest encoded (signed) receipt or voucher.
pub const MAX_RECEIPT_BYTES: usize = 512;

/// Prices per 1000 tokens, in the smallest unit of the domain's currency (wei on an EVM
/// chain): what a node asks, or the most a domain lets its members ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Price {
    /// Per 1000 prompt tokens.
    pub prompt: u64,
    /// Per 1000 completion tokens.
    pub completion: u64,
}

impl Price {
    /// No limit: every price is within it.
    pub const UNLIMITED: Price = Price {
        prompt: u64::MAX,
        completion: u64::MAX,
    };

    /// One price for prompt and completion tokens alike.
    pub const fn flat(per_1000: u64) -> Self {
        Self {
            prompt: per_1000,
            completion: per_1000,
        }
    }

    /// Whether prompt and completion tokens cost the same (what protocol version 1 can state).
    pub fn is_flat(&self) -> bool {
        self.prompt == self.completion
    }

    /// The cost of `prompt_tokens` and `completion_tokens`:
    /// `ceil((prompt_tokens * prompt + completion_tokens * completion) / 1000)`, exact in `u128`.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> u128 {
        (u128::from(prompt_tokens) * u128::from(self.prompt)
            + u128::from(completion_tokens) * u128::from(self.completion))
        .div_ceil(1000)
    }

    /// Whether both prices are at most `ceiling`'s.
    pub fn within(&self, ceiling: &Price) -> bool {
        self.prompt <= ceiling.prompt && self.completion <= ceiling.completion
    }

    /// The higher of each pair of prices.
    pub fn max(&self, other: &Price) -> Price {
        Price {
            prompt: self.prompt.max(other.prompt),
            completion: self.completion.max(other.completion),
        }
    }
}

impl std::fmt::Display for Price {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_flat() {
            write!(f, "{} per 1000 tokens", self.prompt)
        } else {
            write!(
                f,
                "{} per 1000 prompt tokens and {} per 1000 completion tokens",
                self.prompt, self.completion
            )
        }
    }
}

/// The serving node's signed account of one completed request.
///
/// Its fields are in wire order: `completion_price` came with protocol version 2 and is
/// appended; a receipt whose two prices are equal keeps version 1's layout
/// ([`crate::layouts`]).
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
    /// Price per 1000 prompt tokens, in the smallest unit (version 1: of all tokens).
    pub prompt_price: u64,
    /// When the request completed (unix seconds).
    pub timestamp: u64,
    /// Price per 1000 completion tokens (version 2).
    pub completion_price: u64,
}

impl Receipt {
    /// The prices it charges.
    pub fn price(&self) -> Price {
        Price {
            prompt: self.prompt_price,
            completion: self.completion_price,
        }
    }

    /// The amount owed: [`Price::cost`] of its tokens, exact in `u128`.
    pub fn amount(&self) -> u128 {
        self.price()
            .cost(self.prompt_tokens, self.completion_tokens)
    }
}

/// A receipt in protocol version 1's layout: one price for every token.
#[derive(Serialize, Deserialize)]
pub struct ReceiptV1 {
    request_id: RequestId,
    domain: DomainId,
    node: NodeId,
    client: NodeId,
    model_hash: ContentHash,
    prompt_tokens: u64,
    completion_tokens: u64,
    price: u64,
    timestamp: u64,
}

impl crate::layouts::Layouts for Receipt {
    type V1 = ReceiptV1;

    fn to_v1(&self) -> Option<ReceiptV1> {
        self.price().is_flat().then_some(ReceiptV1 {
            request_id: self.request_id,
            domain: self.domain,
            node: self.node,
            client: self.client,
            model_hash: self.model_hash,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            price: self.prompt_price,
            timestamp: self.timestamp,
        })
    }

    fn from_v1(v1: ReceiptV1) -> Self {
        Self {
            request_id: v1.request_id,
            domain: v1.domain,
            node: v1.node,
            client: v1.client,
            model_hash: v1.model_hash,
            prompt_tokens: v1.prompt_tokens,
            completion_tokens: v1.completion_tokens,
            prompt_price: v1.price,
            timestamp: v1.timestamp,
            completion_price: v1.price,
        }
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

    fn signing_bytes(&self) -> Result<Vec<u8>, crate::codec::EncodeError> {
        crate::layouts::signing_bytes(self)
    }
}

/// What the entry node knows of a request it sent, for checking the serving node's receipt
/// ([`Receipt::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The request.
    pub request_id: RequestId,
    /// The domain it was routed in.
    pub domain: DomainId,
    /// The node that finished it (the last one dispatched).
    pub node: NodeId,
    /// The entry node (this node).
    pub client: NodeId,
    /// The prompt tokens the stream's final frame reported.
    pub prompt_tokens: u64,
    /// The completion tokens that node generated: the final frame's count less what earlier
    /// nodes had sent before a failover.
    pub completion_tokens: u64,
    /// The highest prices the node may charge.
    pub max_price: Price,
}

/// Why a receipt is refused.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The signature does not verify, or is not the serving node's.
    #[error("receipt signature: {0}")]
    Signature(#[from] crate::signed::SignedError),
    /// Signed by another node than the one that served.
    #[error("the receipt is signed by {signer}, but {node} served the request")]
    WrongNode {
        /// The node that served.
        node: NodeId,
        /// The receipt's signer.
        signer: NodeId,
    },
    /// A field disagrees with what the entry node knows.
    #[error("the receipt's {field} is {got}, expected {expected}")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// Its value in the receipt.
        got: String,
        /// The entry node's value.
        expected: String,
    },
    /// The price is above what the node may charge.
    #[error("the receipt charges {price}, above the limit of {max}")]
    Overpriced {
        /// The receipt's prices.
        price: Price,
        /// The limit.
        max: Price,
    },
}

impl Receipt {
    /// Checks `signed` against what the entry node knows of the request: signed by the node
    /// that served, for this request, domain and client, with the token counts the stream
    /// reported and a price within the limit. Returns the receipt.
    pub fn check<'a>(
        signed: &'a Signed<Receipt>,
        expected: &Expected,
    ) -> Result<&'a Receipt, ReceiptError> {
        let receipt = signed.verify()?;
        if signed.signer != expected.node {
            return Err(ReceiptError::WrongNode {
                node: expected.node,
                signer: signed.signer,
            });
        }
        fn differ(
            field: &'static str,
            got: impl ToString,
            expected: impl ToString,
        ) -> ReceiptError {
            ReceiptError::Mismatch {
                field,
                got: got.to_string(),
                expected: expected.to_string(),
            }
        }
        if receipt.request_id != expected.request_id {
            return Err(differ(
                "request id",
                receipt.request_id,
                expected.request_id,
            ));
        }
        if receipt.domain != expected.domain {
            return Err(differ("domain", receipt.domain, expected.domain));
        }
        if receipt.client != expected.client {
            return Err(differ("client", receipt.client, expected.client));
        }
        if receipt.prompt_tokens != expected.prompt_tokens {
            return Err(differ(
                "prompt token count",
                receipt.prompt_tokens,
                expected.prompt_tokens,
            ));
        }
        if receipt.completion_tokens != expected.completion_tokens {
            return Err(differ(
                "completion token count",
                receipt.completion_tokens,
                expected.completion_tokens,
            ));
        }
        if !receipt.price().within(&expected.max_price) {
            return Err(ReceiptError::Overpriced {
                price: receipt.price(),
                max: expected.max_price,
            });
        }
        Ok(receipt)
    }
}

/// The escrow contract a voucher is redeemed at: the EIP-712 domain
/// `EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)` with
/// name `GaiaEscrow` and version `2` (protocol/contracts/GaiaEscrow.sol; version 1 had no
/// entry channels). A voucher signed for
/// one chain or contract does not verify at another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    /// The EVM chain id.
    pub chain_id: u64,
    /// The contract's address.
    pub contract: NodeId,
}

impl Escrow {
    /// The EIP-712 domain separator.
    pub fn domain_separator(&self) -> [u8; 32] {
        let mut words = Vec::with_capacity(5 * 32);
        words.extend_from_slice(&keccak(
            b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)",
        ));
        words.extend_from_slice(&keccak(b"GaiaEscrow"));
        words.extend_from_slice(&keccak(b"2"));
        words.extend_from_slice(&uint_word(u128::from(self.chain_id)));
        words.extend_from_slice(&address_word(self.contract));
        keccak(&words)
    }
}

/// A payer's signed promise to pay `payee` up to `cumulative_amount` in all out of its
/// account in the escrow, for what was served through entry node `entry`: the contract's
/// EIP-712 struct `Voucher(address payer,address payee,address entry,uint256
/// cumulativeAmount,uint64 expiresAt)`. Each new voucher of the same channel (payer, payee,
/// entry) supersedes the last with a higher amount, so a node only keeps, and redeems, the
/// latest; each entry node counts on its own channel, so two never race on one amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    /// The paying account (the address of the access key that signs).
    pub payer: NodeId,
    /// The node being paid.
    pub payee: NodeId,
    /// The entry node that debited the account (the channel's owner).
    pub entry: NodeId,
    /// The total owed to `payee` from `payer` so far, in the chain's smallest unit.
    pub cumulative_amount: u128,
    /// When it can no longer be redeemed (unix seconds).
    pub expires_at: u64,
}

impl Voucher {
    /// The EIP-712 type hash of the struct.
    pub fn type_hash() -> [u8; 32] {
        keccak(
            b"Voucher(address payer,address payee,address entry,uint256 cumulativeAmount,\
              uint64 expiresAt)",
        )
    }

    /// `hashStruct(voucher)`: the type hash and the five fields, each ABI-encoded as a word.
    pub fn struct_hash(&self) -> [u8; 32] {
        let mut words = Vec::with_capacity(6 * 32);
        words.extend_from_slice(&Self::type_hash());
        words.extend_from_slice(&address_word(self.payer));
        words.extend_from_slice(&address_word(self.payee));
        words.extend_from_slice(&address_word(self.entry));
        words.extend_from_slice(&uint_word(self.cumulative_amount));
        words.extend_from_slice(&uint_word(u128::from(self.expires_at)));
        keccak(&words)
    }

    /// The digest the payer signs: `keccak256(0x1901 || domainSeparator || hashStruct)`.
    pub fn digest(&self, escrow: &Escrow) -> [u8; 32] {
        let mut bytes = Vec::with_capacity(2 + 64);
        bytes.extend_from_slice(&[0x19, 0x01]);
        bytes.extend_from_slice(&escrow.domain_separator());
        bytes.extend_from_slice(&self.struct_hash());
        keccak(&bytes)
    }

    /// Signs the voucher with the payer's key.
    pub fn sign(self, escrow: &Escrow, key: &SecretKey) -> Result<SignedVoucher, VoucherError> {
        if key.node_id() != self.payer {
            return Err(VoucherError::NotThePayer {
                payer: self.payer,
                signer: key.node_id(),
            });
        }
        let signature = signature::sign_digest(key, &self.digest(escrow))?;
        Ok(SignedVoucher {
            voucher: self,
            signature,
        })
    }
}

/// A voucher and the payer's signature over its EIP-712 digest (65 bytes `r || s || v`, what
/// the contract's `redeem` takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedVoucher {
    /// The voucher.
    pub voucher: Voucher,
    /// The payer's signature.
    pub signature: Signature,
}

impl SignedVoucher {
    /// Checks that the payer signed the voucher for `escrow`; returns it.
    pub fn verify(&self, escrow: &Escrow) -> Result<&Voucher, VoucherError> {
        let signer = signature::recover_digest(&self.voucher.digest(escrow), &self.signature)?;
        if signer != self.voucher.payer {
            return Err(VoucherError::NotThePayer {
                payer: self.voucher.payer,
                signer,
            });
        }
        Ok(&self.voucher)
    }
}

impl Validate for SignedVoucher {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

/// Why a voucher is refused.
#[derive(Debug, thiserror::Error)]
pub enum VoucherError {
    /// The signature is malformed or recovers no key.
    #[error("voucher signature: {0}")]
    Signature(#[from] SignatureError),
    /// Someone other than the payer signed (or is asked to sign).
    #[error("the voucher's payer is {payer} but {signer} signed it")]
    NotThePayer {
        /// The voucher's payer.
        payer: NodeId,
        /// Who signed.
        signer: NodeId,
    },
}

fn keccak(bytes: &[u8]) -> [u8; 32] {
    Keccak256::digest(bytes).into()
}

/// An ABI word holding an unsigned integer (big-endian, left-padded).
fn uint_word(value: u128) -> [u8; 32] {
    let mut word = [0u8; 32];
    word[16..].copy_from_slice(&value.to_be_bytes());
    word
}

/// An ABI word holding an address (left-padded).
fn address_word(address: NodeId) -> [u8; 32] {
    let mut word = [0u8; 32];
    word[12..].copy_from_slice(&address.0);
    word
}

impl_wire!(Receipt, "receipt", MAX_RECEIPT_BYTES);
crate::layouts::impl_layered_wire!(Receipt, "signed receipt", MAX_RECEIPT_BYTES);
impl_wire!(SignedVoucher, "signed voucher", MAX_RECEIPT_BYTES);

/// The most vouchers in one [`VoucherShare`].
pub const MAX_VOUCHERS_PER_SHARE: usize = 64;

/// An entry node's latest vouchers, told to the other entry nodes of its domain (on its gossip
/// topic) so that each counts what an access key spent elsewhere before it lets the key spend
/// more. Each voucher's signature is checked for `escrow`; one that does not verify is a
/// forgery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoucherShare {
    /// The escrow the vouchers are for.
    pub escrow: Escrow,
    /// The vouchers, at most [`MAX_VOUCHERS_PER_SHARE`].
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_VOUCHERS_PER_SHARE>")]
    pub vouchers: Vec<SignedVoucher>,
}

impl VoucherShare {
    /// Checks every voucher's signature for the share's escrow.
    pub fn verify(&self) -> Result<(), VoucherError> {
        for voucher in &self.vouchers {
            voucher.verify(&self.escrow)?;
        }
        Ok(())
    }
}

impl Validate for VoucherShare {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.vouchers.len() > MAX_VOUCHERS_PER_SHARE {
            return Err(ValidationError::TooMany {
                field: "voucher_share.vouchers",
                count: self.vouchers.len(),
                limit: MAX_VOUCHERS_PER_SHARE,
            });
        }
        Ok(())
    }
}

/// The largest encoded [`VoucherShare`].
pub const MAX_VOUCHER_SHARE_BYTES: usize = 64 + MAX_VOUCHERS_PER_SHARE * 256;

impl_wire!(VoucherShare, "voucher share", MAX_VOUCHER_SHARE_BYTES);

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
        receipt.prompt_price = u64::MAX;
        receipt.completion_price = u64::MAX;
        assert!(receipt.amount() > u128::from(u64::MAX));
        receipt.prompt_price = 0;
        receipt.completion_price = 0;
        assert_eq!(receipt.amount(), 0);
        // Prompt and completion tokens at their own prices: 120 * 5 + 80 * 20 = 2200 -> 3.
        receipt.prompt_tokens = 120;
        receipt.completion_tokens = 80;
        receipt.prompt_price = 5;
        receipt.completion_price = 20;
        assert_eq!(receipt.amount(), 3);
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

    fn expected(node: &SecretKey, receipt: &Receipt) -> Expected {
        Expected {
            request_id: receipt.request_id,
            domain: receipt.domain,
            node: node.node_id(),
            client: receipt.client,
            prompt_tokens: receipt.prompt_tokens,
            completion_tokens: receipt.completion_tokens,
            max_price: receipt.price(),
        }
    }

    #[test]
    fn a_receipt_must_match_the_request_the_entry_node_sent() {
        let node = key(1);
        let receipt = sample_receipt(&node, key(2).node_id(), DomainId([1; 32]));
        let signed = Signed::sign(receipt.clone(), &node).unwrap();
        let want = expected(&node, &receipt);
        assert_eq!(Receipt::check(&signed, &want).unwrap(), &receipt);

        // Signed by another member than the one that served.
        let other = key(3);
        let mut by_other = receipt.clone();
        by_other.node = other.node_id();
        let by_other = Signed::sign(by_other, &other).unwrap();
        assert!(matches!(
            Receipt::check(&by_other, &want),
            Err(ReceiptError::WrongNode { .. })
        ));
        // Tampered after signing.
        let mut tampered = signed.clone();
        tampered.payload.completion_tokens += 1;
        assert!(matches!(
            Receipt::check(&tampered, &want),
            Err(ReceiptError::Signature(_))
        ));
        // Each field the entry node knows must agree.
        type Change = fn(&mut Expected);
        let cases: [(&str, Change); 7] = [
            ("request id", |e| e.request_id = RequestId([8; 16])),
            ("domain", |e| e.domain = DomainId([2; 32])),
            ("client", |e| e.client = NodeId([7; 20])),
            ("prompt token count", |e| e.prompt_tokens += 1),
            ("completion token count", |e| e.completion_tokens -= 1),
            ("price", |e| e.max_price.prompt -= 1),
            ("price", |e| e.max_price.completion -= 1),
        ];
        for (what, change) in cases {
            let mut want = want;
            change(&mut want);
            let error = Receipt::check(&signed, &want).unwrap_err();
            match error {
                ReceiptError::Mismatch { field, .. } => assert_eq!(field, what),
                ReceiptError::Overpriced { .. } => assert_eq!(what, "price"),
                other => panic!("{what}: {other}"),
            }
        }
    }

    fn escrow() -> Escrow {
        Escrow {
            chain_id: 1337,
            contract: key(9).node_id(),
        }
    }

    fn voucher(payer: &SecretKey) -> Voucher {
        Voucher {
            payer: payer.node_id(),
            payee: key(1).node_id(),
            entry: key(4).node_id(),
            cumulative_amount: 1_000,
            expires_at: 200,
        }
    }

    #[test]
    fn vouchers_are_signed_by_the_payer_for_one_chain_and_contract() {
        let payer = key(2);
        let signed = voucher(&payer).sign(&escrow(), &payer).unwrap();
        assert_eq!(signed.verify(&escrow()).unwrap(), &voucher(&payer));
        let back = SignedVoucher::from_bytes(&signed.to_bytes().unwrap()).unwrap();
        assert_eq!(back, signed);
        // Another chain, another contract, another amount or another key: refused.
        let other_chain = Escrow {
            chain_id: 1,
            ..escrow()
        };
        assert!(signed.verify(&other_chain).is_err());
        let other_contract = Escrow {
            contract: key(8).node_id(),
            ..escrow()
        };
        assert!(signed.verify(&other_contract).is_err());
        let mut raised = signed;
        raised.voucher.cumulative_amount += 1;
        assert!(raised.verify(&escrow()).is_err());
        // Moved to another entry node's channel: refused.
        let mut moved = signed;
        moved.voucher.entry = key(5).node_id();
        assert!(moved.verify(&escrow()).is_err());
        assert!(matches!(
            voucher(&payer).sign(&escrow(), &key(3)),
            Err(VoucherError::NotThePayer { .. })
        ));
    }

    #[test]
    fn the_voucher_digest_is_eip712() {
        // The EIP-712 type hash of the struct, as Solidity computes it.
        assert_eq!(
            hex::encode(Voucher::type_hash()),
            hex::encode(keccak(
                b"Voucher(address payer,address payee,address entry,uint256 cumulativeAmount,uint64 expiresAt)"
            ))
        );
        // Fields are words: an amount above u64 and the address' 12 zero bytes of padding.
        let v = Voucher {
            payer: NodeId([0x11; 20]),
            payee: NodeId([0x22; 20]),
            entry: NodeId([0x33; 20]),
            cumulative_amount: u128::from(u64::MAX) + 1,
            expires_at: 7,
        };
        let word = uint_word(v.cumulative_amount);
        assert_eq!((word[23], word[..23].iter().any(|b| *b != 0)), (1, false));
        assert_eq!(address_word(v.payer)[..12], [0; 12]);
        let d = v.digest(&escrow());
        let mut prefixed = vec![0x19, 0x01];
        prefixed.extend_from_slice(&escrow().domain_separator());
        prefixed.extend_from_slice(&v.struct_hash());
        assert_eq!(d, keccak(&prefixed));
    }
}
