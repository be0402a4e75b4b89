//! Ethereum-style signatures: keccak-256 digests, 65-byte recoverable `r || s || v`.
//!
//! Two ways to build the digest, which can never collide (their first two bytes differ):
//!
//! - [`sign`]/[`recover`] sign a protocol message of a given [`MessageKind`] as EIP-712 typed
//!   data: `keccak256(0x19 0x01 || domainSeparator || structHash)`, with the fixed domain
//!   `EIP712Domain(string name,string version)` = (`"Gaia"`, `"1"`) (chain-agnostic: no
//!   `chainId`) and, per kind, the struct `<Kind>(bytes payload)`, so
//!   `structHash = keccak256(keccak256("<Kind>(bytes payload)") || keccak256(payload))`.
//!   The type hash differs per kind, so a signature for one kind never verifies as another. An
//!   operator can produce the same signature from an Ethereum wallet with
//!   `eth_signTypedData_v4`.
//! - [`sign_personal`]/[`recover_personal`] sign a free-form message the EIP-191 `personal_sign`
//!   way: `keccak256("\x19Ethereum Signed Message:\n" || len || message)`.
//!
//! Signatures are produced deterministically (RFC 6979) with a low `s` (EIP-2) and `v` in
//! {27, 28}. Recovery accepts `v` in {0, 1, 27, 28} and rejects a high `s`, so each message has
//! exactly one valid signature per key.

use std::fmt;
use std::str::FromStr;

use k256::ecdsa::{RecoveryId, Signature as EcdsaSignature, VerifyingKey};
use sha3::{Digest, Keccak256};

use crate::identity::{NodeId, PublicKey, SecretKey};

/// The EIP-712 domain name of every Gaia signature.
pub const DOMAIN_NAME: &str = "Gaia";
/// The EIP-712 domain version of every Gaia signature.
pub const DOMAIN_VERSION: &str = "1";

/// A signature could not be made, parsed or checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The bytes are not a 65-byte signature.
    #[error("malformed signature: expected 65 bytes (r || s || v), got {len}")]
    BadLength {
        /// The number of bytes received.
        len: usize,
    },
    /// The text is not 130 hex digits.
    #[error("malformed signature text: expected 0x followed by 130 hex digits")]
    BadHex,
    /// `r` or `s` is zero or not below the curve order.
    #[error("malformed signature: r and s must be non-zero and below the secp256k1 order")]
    OutOfRange,
    /// `s` is in the upper half of the order (a malleated signature).
    #[error("non-canonical signature: s is in the upper half of the curve order (EIP-2)")]
    HighS,
    /// `v` is not 0, 1, 27 or 28.
    #[error("malformed signature: recovery byte v is {v}, expected 27 or 28 (or 0 or 1)")]
    BadRecoveryId {
        /// The byte received.
        v: u8,
    },
    /// No public key matches the signature and digest.
    #[error("signature does not match the message: no public key can be recovered from it")]
    RecoveryFailed,
    /// The signature is valid but from another key than the one required.
    #[error("signature is from {recovered}, but it must be from {expected}")]
    WrongSigner {
        /// The address that had to sign.
        expected: NodeId,
        /// The address that did sign.
        recovered: NodeId,
    },
    /// Signing failed (a nonce of zero; probability about 2^-256).
    #[error("signing failed: the secp256k1 signer rejected the digest")]
    SigningFailed,
}

/// What a signed payload is. Each kind has its own EIP-712 struct type, so a signature made for
/// one kind never verifies as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A domain manifest, signed by the domain operator.
    DomainManifest,
    /// A membership certificate, signed by the domain operator.
    MembershipCertificate,
    /// A certificate revocation, signed by the domain operator.
    Revocation,
    /// A node's advert, signed by the node.
    Advert,
    /// A usage receipt, signed by the serving node.
    Receipt,
    /// A payment voucher, signed by the paying client.
    Voucher,
}

impl MessageKind {
    /// Every kind, for exhaustive tests.
    pub const ALL: [MessageKind; 6] = [
        MessageKind::DomainManifest,
        MessageKind::MembershipCertificate,
        MessageKind::Revocation,
        MessageKind::Advert,
        MessageKind::Receipt,
        MessageKind::Voucher,
    ];

    /// The EIP-712 primary type name.
    pub fn type_name(self) -> &'static str {
        match self {
            MessageKind::DomainManifest => "GaiaDomainManifest",
            MessageKind::MembershipCertificate => "GaiaMembershipCertificate",
            MessageKind::Revocation => "GaiaRevocation",
            MessageKind::Advert => "GaiaAdvert",
            MessageKind::Receipt => "GaiaReceipt",
            MessageKind::Voucher => "GaiaVoucher",
        }
    }

    /// The EIP-712 type hash, `keccak256("<TypeName>(bytes payload)")` (computed once).
    pub fn type_hash(self) -> [u8; 32] {
        static HASHES: std::sync::OnceLock<[[u8; 32]; MessageKind::ALL.len()]> =
            std::sync::OnceLock::new();
        let hashes = HASHES.get_or_init(|| {
            MessageKind::ALL.map(|kind| {
                let mut hasher = Keccak256::new();
                hasher.update(kind.type_name().as_bytes());
                hasher.update(b"(bytes payload)");
                hasher.finalize().into()
            })
        });
        let index = MessageKind::ALL
            .iter()
            .position(|kind| *kind == self)
            .unwrap_or_default();
        hashes[index]
    }
}

/// A 65-byte recoverable signature, `r || s || v`.
///
/// Any 65 bytes can be held; [`recover`] and friends check that they form a canonical signature.
/// Shown and written in JSON as `0x` + 130 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 65]);

crate::bytes::fixed_bytes_serde!(Signature);

impl Signature {
    /// Wraps 65 bytes, checking that they form a canonical signature (low `s`, `v` in
    /// {0, 1, 27, 28}).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, SignatureError> {
        let array: [u8; 65] = bytes
            .try_into()
            .map_err(|_| SignatureError::BadLength { len: bytes.len() })?;
        let signature = Self(array);
        signature.parts()?;
        Ok(signature)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 65] {
        &self.0
    }

    /// The recovery byte `v` as stored.
    pub fn v(&self) -> u8 {
        self.0[64]
    }

    /// Splits into a checked ECDSA signature and recovery id.
    fn parts(&self) -> Result<(EcdsaSignature, RecoveryId), SignatureError> {
        let v = self.0[64];
        let parity = match v {
            0 | 27 => false,
            1 | 28 => true,
            _ => return Err(SignatureError::BadRecoveryId { v }),
        };
        let signature =
            EcdsaSignature::from_slice(&self.0[..64]).map_err(|_| SignatureError::OutOfRange)?;
        if signature.normalize_s().is_some() {
            return Err(SignatureError::HighS);
        }
        Ok((signature, RecoveryId::new(parity, false)))
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let digits = text.strip_prefix("0x").unwrap_or(text);
        let mut out = [0u8; 65];
        hex::decode_to_slice(digits, &mut out).map_err(|_| SignatureError::BadHex)?;
        Ok(Self(out))
    }
}

/// `keccak256(keccak256("EIP712Domain(string name,string version)") || keccak256("Gaia") ||
/// keccak256("1"))`.
pub fn domain_separator() -> [u8; 32] {
    static SEPARATOR: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *SEPARATOR.get_or_init(compute_domain_separator)
}

fn compute_domain_separator() -> [u8; 32] {
    let mut hasher = Keccak256::new();
    hasher.update(Keccak256::digest(
        b"EIP712Domain(string name,string version)",
    ));
    hasher.update(Keccak256::digest(DOMAIN_NAME.as_bytes()));
    hasher.update(Keccak256::digest(DOMAIN_VERSION.as_bytes()));
    hasher.finalize().into()
}

/// The EIP-712 digest that [`sign`] signs for `payload` of `kind`.
pub fn typed_digest(kind: MessageKind, payload: &[u8]) -> [u8; 32] {
    let mut struct_hasher = Keccak256::new();
    struct_hasher.update(kind.type_hash());
    struct_hasher.update(Keccak256::digest(payload));
    let struct_hash = struct_hasher.finalize();

    let mut hasher = Keccak256::new();
    hasher.update([0x19, 0x01]);
    hasher.update(domain_separator());
    hasher.update(struct_hash);
    hasher.finalize().into()
}

/// The EIP-191 `personal_sign` digest of `message`.
pub fn personal_digest(message: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak256::new();
    hasher.update(b"\x19Ethereum Signed Message:\n");
    hasher.update(message.len().to_string().as_bytes());
    hasher.update(message);
    hasher.finalize().into()
}

/// Signs a 32-byte digest: low `s`, `v` in {27, 28}.
pub fn sign_digest(key: &SecretKey, digest: &[u8; 32]) -> Result<Signature, SignatureError> {
    let (signature, recovery_id) = key
        .signing_key()
        .sign_prehash_recoverable(digest)
        .map_err(|_| SignatureError::SigningFailed)?;
    let (signature, parity) = match signature.normalize_s() {
        // Negating s mirrors R, which flips the parity of its y coordinate.
        Some(low) => (low, !recovery_id.is_y_odd()),
        None => (signature, recovery_id.is_y_odd()),
    };
    let mut out = [0u8; 65];
    out[..64].copy_from_slice(&signature.to_bytes());
    out[64] = 27 + u8::from(parity);
    Ok(Signature(out))
}

/// The public key that signed `digest`.
pub fn recover_digest_key(
    digest: &[u8; 32],
    signature: &Signature,
) -> Result<PublicKey, SignatureError> {
    let (signature, recovery_id) = signature.parts()?;
    VerifyingKey::recover_from_prehash(digest, &signature, recovery_id)
        .map(PublicKey::from_verifying_key)
        .map_err(|_| SignatureError::RecoveryFailed)
}

/// The address that signed `digest`.
///
/// Successful recoveries are remembered in a small process-wide cache keyed by the digest and
/// the signature, so the same signed value seen again (a certificate carried on every advert
/// of its member, an advert received by gossip and again in a snapshot, or by each of the
/// thousands of nodes a simulation runs in one process) costs a hash lookup instead of an
/// elliptic-curve recovery. A failed recovery is not cached.
pub fn recover_digest(digest: &[u8; 32], signature: &Signature) -> Result<NodeId, SignatureError> {
    if let Some(node) = recovery_cache::get(digest, signature) {
        return Ok(node);
    }
    let node = recover_digest_key(digest, signature).map(|key| key.node_id())?;
    recovery_cache::put(digest, signature, node);
    Ok(node)
}

mod recovery_cache {
    //! Two generations of at most [`GENERATION`] entries: when the young one is full it
    //! becomes the old one and the previous old one is dropped, so the cache is bounded
    //! (about 2 x 8 192 x 130 bytes) and keeps what was used recently.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::{NodeId, Signature};

    const GENERATION: usize = 8192;

    type Key = ([u8; 32], [u8; 65]);

    struct Cache {
        young: HashMap<Key, NodeId>,
        old: HashMap<Key, NodeId>,
    }

    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

    pub(super) fn get(digest: &[u8; 32], signature: &Signature) -> Option<NodeId> {
        let key = (*digest, signature.0);
        let guard = CACHE.lock().ok()?;
        let cache = guard.as_ref()?;
        cache
            .young
            .get(&key)
            .or_else(|| cache.old.get(&key))
            .copied()
    }

    pub(super) fn put(digest: &[u8; 32], signature: &Signature, node: NodeId) {
        let Ok(mut guard) = CACHE.lock() else {
            return;
        };
        let cache = guard.get_or_insert_with(|| Cache {
            young: HashMap::new(),
            old: HashMap::new(),
        });
        if cache.young.len() >= GENERATION {
            cache.old = std::mem::take(&mut cache.young);
        }
        cache.young.insert((*digest, signature.0), node);
    }
}

/// Signs `payload` as a message of `kind`.
pub fn sign(
    key: &SecretKey,
    kind: MessageKind,
    payload: &[u8],
) -> Result<Signature, SignatureError> {
    sign_digest(key, &typed_digest(kind, payload))
}

/// The address that signed `payload` as a message of `kind`.
///
/// Any signature recovers *some* address: compare it with the one you expect, or use [`verify`].
pub fn recover(
    kind: MessageKind,
    payload: &[u8],
    signature: &Signature,
) -> Result<NodeId, SignatureError> {
    recover_digest(&typed_digest(kind, payload), signature)
}

/// Checks that `expected` signed `payload` as a message of `kind`.
pub fn verify(
    kind: MessageKind,
    payload: &[u8],
    signature: &Signature,
    expected: NodeId,
) -> Result<(), SignatureError> {
    let recovered = recover(kind, payload, signature)?;
    if recovered != expected {
        return Err(SignatureError::WrongSigner {
            expected,
            recovered,
        });
    }
    Ok(())
}

/// Signs `message` the EIP-191 `personal_sign` way.
pub fn sign_personal(key: &SecretKey, message: &[u8]) -> Result<Signature, SignatureError> {
    sign_digest(key, &personal_digest(message))
}

/// The address that `personal_sign`ed `message`.
pub fn recover_personal(message: &[u8], signature: &Signature) -> Result<NodeId, SignatureError> {
    recover_digest(&personal_digest(message), signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN_KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    fn key() -> SecretKey {
        SecretKey::from_hex(KNOWN_KEY).unwrap()
    }

    #[test]
    fn personal_sign_matches_the_web3_vector() {
        // web3.js `accounts.sign('Some data', 0x4c08…2318)`.
        let digest = personal_digest(b"Some data");
        assert_eq!(
            hex::encode(digest),
            "1da44b586eb0729ff70a73c326926f6ed5a25f5b056e7f47fbc6e58d86871655"
        );
        let signature = sign_personal(&key(), b"Some data").unwrap();
        assert_eq!(
            signature.to_string(),
            "0xb91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd6007e74cd82e037b\
             800186422fc2da167c747ef045e5d18a5f5d4300f8e1a0291c"
        );
        assert_eq!(
            recover_personal(b"Some data", &signature).unwrap(),
            key().node_id()
        );
    }

    #[test]
    fn typed_round_trip_for_every_kind() {
        let key = key();
        for kind in MessageKind::ALL {
            let signature = sign(&key, kind, b"payload").unwrap();
            assert!(signature.v() == 27 || signature.v() == 28);
            assert_eq!(
                recover(kind, b"payload", &signature).unwrap(),
                key.node_id()
            );
            verify(kind, b"payload", &signature, key.node_id()).unwrap();
        }
    }

    #[test]
    fn cross_kind_replay_is_rejected() {
        let key = key();
        for kind in MessageKind::ALL {
            let signature = sign(&key, kind, b"payload").unwrap();
            for other in MessageKind::ALL.into_iter().filter(|k| *k != kind) {
                let result = verify(other, b"payload", &signature, key.node_id());
                assert!(result.is_err(), "{kind:?} signature verified as {other:?}");
            }
            // A typed signature is never a personal_sign signature of the same bytes.
            assert_ne!(
                recover_personal(b"payload", &signature).ok(),
                Some(key.node_id())
            );
        }
        let type_hashes: std::collections::HashSet<_> =
            MessageKind::ALL.iter().map(|k| k.type_hash()).collect();
        assert_eq!(type_hashes.len(), MessageKind::ALL.len());
    }

    #[test]
    fn tampering_is_detected() {
        let key = key();
        let signature = sign(&key, MessageKind::Advert, b"payload").unwrap();
        let err = verify(MessageKind::Advert, b"paylaod", &signature, key.node_id()).unwrap_err();
        assert!(matches!(
            err,
            SignatureError::WrongSigner { .. } | SignatureError::RecoveryFailed
        ));
        for i in [0usize, 31, 32, 63] {
            let mut bad = signature;
            bad.0[i] ^= 0x01;
            assert!(verify(MessageKind::Advert, b"payload", &bad, key.node_id()).is_err());
        }
        let other = SecretKey::from_bytes(&[7u8; 32]).unwrap();
        let err = verify(MessageKind::Advert, b"payload", &signature, other.node_id()).unwrap_err();
        assert_eq!(
            err,
            SignatureError::WrongSigner {
                expected: other.node_id(),
                recovered: key.node_id()
            }
        );
    }

    #[test]
    fn malformed_signatures_are_errors() {
        let key = key();
        let good = sign(&key, MessageKind::Receipt, b"x").unwrap();
        assert_eq!(
            Signature::from_slice(&good.0[..64]).unwrap_err(),
            SignatureError::BadLength { len: 64 }
        );
        assert_eq!(Signature::from_slice(&good.0).unwrap(), good);

        let mut bad_v = good;
        bad_v.0[64] = 29;
        assert_eq!(
            recover(MessageKind::Receipt, b"x", &bad_v).unwrap_err(),
            SignatureError::BadRecoveryId { v: 29 }
        );
        // v as 0/1 is accepted and recovers the same signer.
        let mut zero_based = good;
        zero_based.0[64] -= 27;
        assert_eq!(
            recover(MessageKind::Receipt, b"x", &zero_based).unwrap(),
            key.node_id()
        );

        let zero = Signature([0u8; 65]);
        assert!(recover(MessageKind::Receipt, b"x", &zero).is_err());
        let ones = Signature([0xff; 65]);
        assert!(recover(MessageKind::Receipt, b"x", &ones).is_err());
    }

    #[test]
    fn high_s_is_rejected() {
        let key = key();
        let good = sign(&key, MessageKind::Advert, b"m").unwrap();
        let ecdsa = EcdsaSignature::from_slice(&good.0[..64]).unwrap();
        // n - s: the malleated twin of a valid signature.
        let (r, s) = ecdsa.split_scalars();
        let high = EcdsaSignature::from_scalars(r, -*s).unwrap();
        let mut malleated = [0u8; 65];
        malleated[..64].copy_from_slice(&high.to_bytes());
        malleated[64] = if good.v() == 27 { 28 } else { 27 };
        assert_eq!(
            recover(MessageKind::Advert, b"m", &Signature(malleated)).unwrap_err(),
            SignatureError::HighS
        );
    }

    #[test]
    fn signatures_are_deterministic_and_text_round_trips() {
        let key = key();
        let a = sign(&key, MessageKind::Voucher, b"m").unwrap();
        let b = sign(&key, MessageKind::Voucher, b"m").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string().parse::<Signature>().unwrap(), a);
        assert_eq!(
            "0x12".parse::<Signature>().unwrap_err(),
            SignatureError::BadHex
        );
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Signature>(&json).unwrap(), a);
        let bin = bincode::serde::encode_to_vec(a, bincode::config::standard()).unwrap();
        assert_eq!(bin.len(), 65);
    }
}
