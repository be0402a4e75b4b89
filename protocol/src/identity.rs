//! Node identity: one secp256k1 key per node, named by its Ethereum address.
//!
//! The same key gives the node's [`NodeId`] (the Ethereum address: the last 20 bytes of the
//! keccak-256 of the uncompressed public key without its `0x04` prefix) and, in the node crate,
//! its libp2p identity: [`SecretKey::public_key_compressed`] is the 33-byte SEC1 form that
//! libp2p's secp256k1 public keys carry, and [`NodeId::from_sec1_bytes`] maps such a key (from a
//! `PeerId`) back to the address.

use std::fmt;
use std::str::FromStr;

use k256::ecdsa::{SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use sha3::{Digest, Keccak256};
use zeroize::Zeroizing;

/// A secret key or public key could not be built from the bytes given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The secret key bytes are zero or not below the curve order.
    #[error(
        "invalid secp256k1 secret key: it must be 32 bytes, non-zero and below the curve order"
    )]
    InvalidSecretKey,
    /// The secret key text is not 64 hex digits.
    #[error("invalid secret key text: expected 64 hex digits, optionally prefixed with 0x")]
    InvalidSecretKeyHex,
    /// The public key bytes are not a point on secp256k1 in SEC1 form.
    #[error(
        "invalid secp256k1 public key ({len} bytes): expected a 33-byte compressed or 65-byte \
         uncompressed SEC1 point on the curve"
    )]
    InvalidPublicKey {
        /// The number of bytes received.
        len: usize,
    },
}

/// A node's address: the Ethereum address of its secp256k1 key.
///
/// `Display` writes the EIP-55 mixed-case checksum form (`0x5aAe…`); `FromStr` accepts the
/// address in any single case, or in mixed case when the checksum is right.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 20]);

crate::bytes::fixed_bytes_serde!(NodeId);

impl NodeId {
    /// The address of `key`.
    pub fn from_public_key(key: &PublicKey) -> Self {
        let point = key.to_uncompressed();
        let digest = Keccak256::digest(&point[1..]);
        let mut out = [0u8; 20];
        out.copy_from_slice(&digest[12..]);
        Self(out)
    }

    /// The address of a SEC1-encoded public key (33 bytes compressed or 65 uncompressed), as
    /// found inside a libp2p secp256k1 `PeerId`.
    pub fn from_sec1_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        PublicKey::from_sec1_bytes(bytes).map(|key| key.node_id())
    }

    /// The raw 20 bytes.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// The EIP-55 checksummed text, `0x` followed by 40 mixed-case hex digits.
    pub fn to_checksum_string(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = Keccak256::digest(lower.as_bytes());
        let mut out = String::with_capacity(42);
        out.push_str("0x");
        for (i, c) in lower.chars().enumerate() {
            let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
            if c.is_ascii_alphabetic() && nibble >= 8 {
                out.push(c.to_ascii_uppercase());
            } else {
                out.push(c);
            }
        }
        out
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_checksum_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// The text is not an Ethereum address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node address {input:?}: {reason}")]
pub struct ParseNodeIdError {
    input: String,
    reason: &'static str,
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseNodeIdError {
            input: s.chars().take(64).collect(),
            reason,
        };
        let text = s.trim();
        let digits = text
            .strip_prefix("0x")
            .or_else(|| text.strip_prefix("0X"))
            .unwrap_or(text);
        if digits.len() != 40 {
            return Err(fail("expected 40 hex digits, optionally prefixed with 0x"));
        }
        let mut out = [0u8; 20];
        hex::decode_to_slice(digits, &mut out)
            .map_err(|_| fail("expected 40 hex digits, optionally prefixed with 0x"))?;
        let id = NodeId(out);
        let has_upper = digits.bytes().any(|b| b.is_ascii_uppercase());
        let has_lower = digits.bytes().any(|b| b.is_ascii_lowercase());
        if has_upper && has_lower && id.to_checksum_string()[2..] != *digits {
            return Err(fail(
                "the mixed-case EIP-55 checksum does not match (a typo?); check the address or \
                 write it in a single case",
            ));
        }
        Ok(id)
    }
}

/// A secp256k1 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses a SEC1 point: 33 bytes compressed or 65 bytes uncompressed.
    pub fn from_sec1_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        VerifyingKey::from_sec1_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidPublicKey { len: bytes.len() })
    }

    /// The 33-byte compressed SEC1 form (the form libp2p's secp256k1 keys use).
    pub fn to_compressed(&self) -> [u8; 33] {
        let mut out = [0u8; 33];
        out.copy_from_slice(self.0.to_encoded_point(true).as_bytes());
        out
    }

    /// The 65-byte uncompressed SEC1 form, `0x04 || x || y`.
    pub fn to_uncompressed(&self) -> [u8; 65] {
        let mut out = [0u8; 65];
        out.copy_from_slice(self.0.to_encoded_point(false).as_bytes());
        out
    }

    /// The node address of this key.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(self)
    }

    pub(crate) fn from_verifying_key(key: VerifyingKey) -> Self {
        Self(key)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(0x{})", hex::encode(self.to_compressed()))
    }
}

/// A node's secp256k1 secret key.
///
/// The key material is wiped from memory when the value is dropped, and `Debug` shows only the
/// address, never the key.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        Self::random(&mut rand::rngs::OsRng)
    }

    /// A fresh key from `rng` (pass a seeded rng in tests for reproducible keys).
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(SigningKey::random(rng))
    }

    /// The key with the big-endian scalar `bytes`.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        SigningKey::from_bytes(bytes.into())
            .map(Self)
            .map_err(|_| KeyError::InvalidSecretKey)
    }

    /// The key written as 64 hex digits, with or without a `0x` prefix.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let digits = text.strip_prefix("0x").unwrap_or(text);
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(digits, bytes.as_mut()).map_err(|_| KeyError::InvalidSecretKeyHex)?;
        Self::from_bytes(&bytes)
    }

    /// The big-endian scalar; the copy is wiped when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes().into())
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(*self.0.verifying_key())
    }

    /// The 33-byte compressed public key, from which the node crate builds the libp2p
    /// secp256k1 identity.
    pub fn public_key_compressed(&self) -> [u8; 33] {
        self.public_key().to_compressed()
    }

    /// The node address of this key.
    pub fn node_id(&self) -> NodeId {
        self.public_key().node_id()
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("node_id", &self.node_id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN_KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    #[test]
    fn known_private_key_has_known_address() {
        let key = SecretKey::from_hex(KNOWN_KEY).unwrap();
        assert_eq!(
            key.node_id().to_string(),
            "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
        );
        let with_prefix = SecretKey::from_hex(&format!("0x{KNOWN_KEY}")).unwrap();
        assert_eq!(with_prefix.node_id(), key.node_id());
        assert_eq!(hex::encode(key.to_bytes()), KNOWN_KEY);
    }

    #[test]
    fn eip55_examples_round_trip() {
        // The examples from EIP-55 itself.
        for text in [
            "0x52908400098527886E0F7030069857D2E4169EE7",
            "0x8617E340B3D01FA5F11F306F4090FD50E238070D",
            "0xde709f2102306220921060314715629080e2fb77",
            "0x27b1fdb04752bbc536007a920d24acb045561c26",
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
            "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ] {
            let id: NodeId = text.parse().unwrap();
            // All-caps and all-lower examples are checksums whose letters happen to be uniform.
            assert_eq!(id.to_string(), text);
            assert_eq!(text.to_lowercase().parse::<NodeId>().unwrap(), id);
            assert_eq!(text[2..].to_uppercase().parse::<NodeId>().unwrap(), id);
            assert_eq!(text[2..].parse::<NodeId>().unwrap(), id);
        }
    }

    #[test]
    fn bad_checksum_and_bad_text_are_rejected() {
        let err = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"
            .parse::<NodeId>()
            .unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        for bad in [
            "",
            "0x",
            "0x1234",
            "0xzz7536E3605D9C16a7a3D7b1898e529396a65c23",
            "0x2c7536E3605D9C16a7a3D7b1898e529396a65c2300",
        ] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn public_key_forms_give_the_same_address() {
        let key = SecretKey::from_hex(KNOWN_KEY).unwrap();
        let compressed = key.public_key_compressed();
        assert_eq!(compressed.len(), 33);
        assert!(compressed[0] == 2 || compressed[0] == 3);
        assert_eq!(NodeId::from_sec1_bytes(&compressed).unwrap(), key.node_id());
        let uncompressed = key.public_key().to_uncompressed();
        assert_eq!(uncompressed[0], 4);
        assert_eq!(
            NodeId::from_sec1_bytes(&uncompressed).unwrap(),
            key.node_id()
        );
        assert!(matches!(
            NodeId::from_sec1_bytes(&[2u8; 12]),
            Err(KeyError::InvalidPublicKey { len: 12 })
        ));
        // x = 5 is not on secp256k1 (5^3 + 7 = 132 is not a square mod p).
        let mut off_curve = [0u8; 33];
        off_curve[0] = 2;
        off_curve[32] = 5;
        assert!(NodeId::from_sec1_bytes(&off_curve).is_err());
    }

    #[test]
    fn invalid_secret_keys_are_rejected() {
        assert_eq!(
            SecretKey::from_bytes(&[0u8; 32]).unwrap_err(),
            KeyError::InvalidSecretKey
        );
        assert_eq!(
            SecretKey::from_bytes(&[0xff; 32]).unwrap_err(),
            KeyError::InvalidSecretKey
        );
        assert_eq!(
            SecretKey::from_hex("12").unwrap_err(),
            KeyError::InvalidSecretKeyHex
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = SecretKey::from_hex(KNOWN_KEY).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.to_lowercase().contains(&KNOWN_KEY[..16]), "{shown}");
        assert!(
            shown.contains("0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"),
            "{shown}"
        );
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            SecretKey::generate().node_id(),
            SecretKey::generate().node_id()
        );
    }

    #[test]
    fn node_id_serde_is_text_in_json_and_20_bytes_in_bincode() {
        let id: NodeId = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
            .parse()
            .unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"0x2c7536E3605D9C16a7a3D7b1898e529396a65c23\"");
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        let bin = bincode::serde::encode_to_vec(id, bincode::config::standard()).unwrap();
        assert_eq!(bin, id.0);
        let (back, used): (NodeId, usize) =
            bincode::serde::decode_from_slice(&bin, bincode::config::standard()).unwrap();
        assert_eq!((back, used), (id, 20));
    }
}
