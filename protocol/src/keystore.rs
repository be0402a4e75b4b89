//! Ethereum keystore v3 ("Web3 Secret Storage") files: the node key at rest, under a password.
//!
//! Writing uses scrypt (geth's standard cost by default, [`ScryptParams::STANDARD`]) and
//! AES-128-CTR; reading also accepts PBKDF2-HMAC-SHA256, so a key exported from geth, MetaMask or
//! any other v3 wallet can be imported. The MAC (`keccak256(dk[16..32] || ciphertext)`) is checked
//! before decryption, so a wrong password is reported as such and never yields a wrong key.
//!
//! This module only turns keys into JSON text and back; reading and writing the file (with
//! owner-only permissions) is the caller's job.

use aes::cipher::{KeyIvInit, StreamCipher};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha3::{Digest, Keccak256};
use zeroize::Zeroizing;

use crate::identity::{KeyError, NodeId, SecretKey};

type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;

/// The largest keystore file read, in bytes (real ones are about 500 bytes).
pub const MAX_KEYSTORE_BYTES: usize = 64 * 1024;
/// The most memory a keystore's scrypt parameters may ask for (`128 * r * n` bytes).
pub const MAX_SCRYPT_MEMORY: u64 = 1 << 30;
/// The most work a keystore's scrypt parameters may ask for (`n * r * p`; geth's standard
/// cost is 2^21).
pub const MAX_SCRYPT_WORK: u64 = 1 << 25;
/// The most PBKDF2 iterations a keystore may ask for.
pub const MAX_PBKDF2_ROUNDS: u32 = 10_000_000;

/// A keystore could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// The text is not JSON of the v3 shape.
    #[error("not a Web3 Secret Storage (keystore v3) JSON file: {0}")]
    Json(#[from] serde_json::Error),
    /// The file is far larger than any keystore.
    #[error("keystore is {size} bytes, above the limit of {limit} bytes: is this the right file?")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Another version than 3.
    #[error("keystore version {0} is not supported: only version 3 files can be read")]
    UnsupportedVersion(u64),
    /// A cipher other than AES-128-CTR.
    #[error("keystore cipher {0:?} is not supported: only aes-128-ctr")]
    UnsupportedCipher(String),
    /// A key derivation function other than scrypt and PBKDF2.
    #[error("keystore kdf {0:?} is not supported: only scrypt and pbkdf2")]
    UnsupportedKdf(String),
    /// A PBKDF2 pseudo-random function other than HMAC-SHA256.
    #[error("keystore pbkdf2 prf {0:?} is not supported: only hmac-sha256")]
    UnsupportedPrf(String),
    /// A field is missing or has a value outside what the format allows.
    #[error("keystore field {field} is invalid: {reason}")]
    BadField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The key derivation parameters would cost more memory or time than allowed.
    #[error(
        "keystore kdf parameters are too costly ({reason}); refusing to derive the key: \
         re-export the key with standard parameters"
    )]
    TooCostly {
        /// What is over the limit.
        reason: String,
    },
    /// The MAC does not match: the password is wrong or the file was altered.
    #[error("wrong password or corrupt keystore: the MAC check failed")]
    WrongPassword,
    /// The decrypted key is not a valid secp256k1 key.
    #[error("keystore holds an invalid key: {0}")]
    InvalidKey(#[from] KeyError),
    /// The `address` field names another key than the one decrypted.
    #[error("keystore says it holds {stated} but the decrypted key is {actual}: corrupt keystore")]
    AddressMismatch {
        /// The address in the file.
        stated: NodeId,
        /// The address of the decrypted key.
        actual: NodeId,
    },
}

/// scrypt cost parameters for new keystores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScryptParams {
    /// log2 of the CPU/memory cost `n`.
    pub log_n: u8,
    /// Block size `r`.
    pub r: u32,
    /// Parallelism `p`.
    pub p: u32,
}

impl ScryptParams {
    /// geth's standard cost: n = 2^18, r = 8, p = 1 (256 MiB, about a second).
    pub const STANDARD: ScryptParams = ScryptParams {
        log_n: 18,
        r: 8,
        p: 1,
    };
    /// geth's light cost: n = 2^12, r = 8, p = 6 (4 MiB).
    pub const LIGHT: ScryptParams = ScryptParams {
        log_n: 12,
        r: 8,
        p: 6,
    };
    /// A very cheap cost for tests only: n = 2^10, r = 8, p = 1.
    pub const INSECURE_TEST: ScryptParams = ScryptParams {
        log_n: 10,
        r: 8,
        p: 1,
    };
}

impl Default for ScryptParams {
    fn default() -> Self {
        Self::STANDARD
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct KeystoreJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(alias = "Crypto")]
    crypto: CryptoJson,
    id: String,
    version: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CryptoJson {
    cipher: String,
    cipherparams: CipherParamsJson,
    ciphertext: String,
    kdf: String,
    kdfparams: KdfParamsJson,
    mac: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct CipherParamsJson {
    iv: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KdfParamsJson {
    dklen: u64,
    salt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prf: Option<String>,
}

/// Encrypts `key` under `password` into keystore v3 JSON, with fresh randomness from the
/// operating system.
pub fn encrypt(
    key: &SecretKey,
    password: &[u8],
    params: ScryptParams,
) -> Result<String, KeystoreError> {
    encrypt_with_rng(key, password, params, &mut rand::rngs::OsRng)
}

/// Encrypts `key` under `password` into keystore v3 JSON, drawing the salt, IV and id from
/// `rng`.
pub fn encrypt_with_rng<R: RngCore + CryptoRng>(
    key: &SecretKey,
    password: &[u8],
    params: ScryptParams,
    rng: &mut R,
) -> Result<String, KeystoreError> {
    let mut salt = [0u8; 32];
    let mut iv = [0u8; 16];
    let mut uuid = [0u8; 16];
    rng.fill_bytes(&mut salt);
    rng.fill_bytes(&mut iv);
    rng.fill_bytes(&mut uuid);

    let scrypt_params = scrypt::Params::new(params.log_n, params.r, params.p).map_err(|_| {
        KeystoreError::BadField {
            field: "kdfparams",
            reason: format!("invalid scrypt parameters {params:?}"),
        }
    })?;
    let mut derived = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(password, &salt, &scrypt_params, derived.as_mut()).map_err(|_| {
        KeystoreError::BadField {
            field: "kdfparams.dklen",
            reason: "scrypt rejected the output length".into(),
        }
    })?;

    let mut ciphertext = *key.to_bytes();
    apply_aes_ctr(&derived[..16], &iv, &mut ciphertext)?;
    let mac = mac(&derived[16..32], &ciphertext);

    let file = KeystoreJson {
        address: Some(hex::encode(key.node_id().0)),
        crypto: CryptoJson {
            cipher: "aes-128-ctr".into(),
            cipherparams: CipherParamsJson {
                iv: hex::encode(iv),
            },
            ciphertext: hex::encode(ciphertext),
            kdf: "scrypt".into(),
            kdfparams: KdfParamsJson {
                dklen: 32,
                salt: hex::encode(salt),
                n: Some(1u64 << params.log_n),
                r: Some(u64::from(params.r)),
                p: Some(u64::from(params.p)),
                ..KdfParamsJson::default()
            },
            mac: hex::encode(mac),
        },
        id: format_uuid_v4(uuid),
        version: 3,
    };
    Ok(serde_json::to_string_pretty(&file)?)
}

/// Decrypts keystore v3 JSON with `password`.
pub fn decrypt(json: &str, password: &[u8]) -> Result<SecretKey, KeystoreError> {
    let file = parse(json)?;
    let crypto = &file.crypto;
    if !crypto.cipher.eq_ignore_ascii_case("aes-128-ctr") {
        return Err(KeystoreError::UnsupportedCipher(crypto.cipher.clone()));
    }
    let iv: [u8; 16] = hex_field("crypto.cipherparams.iv", &crypto.cipherparams.iv)?;
    let ciphertext: [u8; 32] = hex_field("crypto.ciphertext", &crypto.ciphertext)?;
    let expected_mac: [u8; 32] = hex_field("crypto.mac", &crypto.mac)?;
    let derived = derive_key(&crypto.kdf, &crypto.kdfparams, password)?;

    let actual_mac = mac(&derived[16..32], &ciphertext);
    // Constant-time comparison: the MAC is the password check.
    let diff = actual_mac
        .iter()
        .zip(expected_mac.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(KeystoreError::WrongPassword);
    }

    let mut plain = Zeroizing::new(ciphertext);
    apply_aes_ctr(&derived[..16], &iv, plain.as_mut())?;
    let key = SecretKey::from_bytes(&plain)?;
    if let Some(stated) = stated_address(&file)? {
        let actual = key.node_id();
        if stated != actual {
            return Err(KeystoreError::AddressMismatch { stated, actual });
        }
    }
    Ok(key)
}

/// The address a keystore says it holds (its `address` field), read without the password.
pub fn address(json: &str) -> Result<Option<NodeId>, KeystoreError> {
    stated_address(&parse(json)?)
}

fn parse(json: &str) -> Result<KeystoreJson, KeystoreError> {
    if json.len() > MAX_KEYSTORE_BYTES {
        return Err(KeystoreError::TooLarge {
            size: json.len(),
            limit: MAX_KEYSTORE_BYTES,
        });
    }
    let file: KeystoreJson = serde_json::from_str(json)?;
    if file.version != 3 {
        return Err(KeystoreError::UnsupportedVersion(file.version));
    }
    Ok(file)
}

fn stated_address(file: &KeystoreJson) -> Result<Option<NodeId>, KeystoreError> {
    match &file.address {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|e| KeystoreError::BadField {
            field: "address",
            reason: format!("{e}"),
        }),
    }
}

fn derive_key(
    kdf: &str,
    params: &KdfParamsJson,
    password: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    let dklen = usize::try_from(params.dklen).unwrap_or(usize::MAX);
    if !(32..=64).contains(&dklen) {
        return Err(KeystoreError::BadField {
            field: "crypto.kdfparams.dklen",
            reason: format!("{} is outside 32..=64", params.dklen),
        });
    }
    let salt = hex_vec("crypto.kdfparams.salt", &params.salt, 1024)?;
    let mut derived = Zeroizing::new(vec![0u8; dklen]);
    match kdf.to_ascii_lowercase().as_str() {
        "scrypt" => {
            let n = required(params.n, "crypto.kdfparams.n")?;
            let r = required(params.r, "crypto.kdfparams.r")?;
            let p = required(params.p, "crypto.kdfparams.p")?;
            if n < 2 || !n.is_power_of_two() {
                return Err(KeystoreError::BadField {
                    field: "crypto.kdfparams.n",
                    reason: format!("{n} is not a power of two above 1"),
                });
            }
            if r == 0 || p == 0 {
                return Err(KeystoreError::BadField {
                    field: "crypto.kdfparams",
                    reason: "r and p must be at least 1".into(),
                });
            }
            let memory = n.checked_mul(r).and_then(|v| v.checked_mul(128));
            if memory.is_none_or(|m| m > MAX_SCRYPT_MEMORY) {
                return Err(KeystoreError::TooCostly {
                    reason: format!(
                        "scrypt n={n} r={r} needs more than {} MiB",
                        MAX_SCRYPT_MEMORY >> 20
                    ),
                });
            }
            let work = n.checked_mul(r).and_then(|v| v.checked_mul(p));
            if work.is_none_or(|w| w > MAX_SCRYPT_WORK) {
                return Err(KeystoreError::TooCostly {
                    reason: format!("scrypt n*r*p = {n}*{r}*{p} is above {MAX_SCRYPT_WORK}"),
                });
            }
            // The bounds above make these conversions lossless.
            let log_n = u8::try_from(n.trailing_zeros()).unwrap_or(u8::MAX);
            let r = u32::try_from(r).unwrap_or(u32::MAX);
            let p = u32::try_from(p).unwrap_or(u32::MAX);
            let scrypt_params =
                scrypt::Params::new(log_n, r, p).map_err(|_| KeystoreError::BadField {
                    field: "crypto.kdfparams",
                    reason: format!("invalid scrypt parameters n={n} r={r} p={p}"),
                })?;
            scrypt::scrypt(password, &salt, &scrypt_params, derived.as_mut()).map_err(|_| {
                KeystoreError::BadField {
                    field: "crypto.kdfparams.dklen",
                    reason: "scrypt rejected the output length".into(),
                }
            })?;
        }
        "pbkdf2" => {
            let prf = params.prf.as_deref().unwrap_or("hmac-sha256");
            if !prf.eq_ignore_ascii_case("hmac-sha256") {
                return Err(KeystoreError::UnsupportedPrf(prf.to_string()));
            }
            let rounds = required(params.c, "crypto.kdfparams.c")?;
            if rounds == 0 {
                return Err(KeystoreError::BadField {
                    field: "crypto.kdfparams.c",
                    reason: "must be at least 1".into(),
                });
            }
            let rounds = u32::try_from(rounds)
                .ok()
                .filter(|r| *r <= MAX_PBKDF2_ROUNDS)
                .ok_or_else(|| KeystoreError::TooCostly {
                    reason: format!("pbkdf2 c={rounds} is above {MAX_PBKDF2_ROUNDS}"),
                })?;
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, &salt, rounds, derived.as_mut());
        }
        other => return Err(KeystoreError::UnsupportedKdf(other.to_string())),
    }
    Ok(derived)
}

fn required(value: Option<u64>, field: &'static str) -> Result<u64, KeystoreError> {
    value.ok_or(KeystoreError::BadField {
        field,
        reason: "missing".into(),
    })
}

fn apply_aes_ctr(key: &[u8], iv: &[u8; 16], data: &mut [u8]) -> Result<(), KeystoreError> {
    let mut cipher = Aes128Ctr::new_from_slices(key, iv).map_err(|_| KeystoreError::BadField {
        field: "crypto.cipherparams.iv",
        reason: "AES-128-CTR needs a 16-byte key and a 16-byte IV".into(),
    })?;
    cipher.apply_keystream(data);
    Ok(())
}

fn mac(mac_key: &[u8], ciphertext: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak256::new();
    hasher.update(mac_key);
    hasher.update(ciphertext);
    hasher.finalize().into()
}

fn hex_field<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], KeystoreError> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    let mut out = [0u8; N];
    hex::decode_to_slice(digits, &mut out).map_err(|_| KeystoreError::BadField {
        field,
        reason: format!("expected {} hex digits", 2 * N),
    })?;
    Ok(out)
}

fn hex_vec(field: &'static str, text: &str, max_bytes: usize) -> Result<Vec<u8>, KeystoreError> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.len() > 2 * max_bytes {
        return Err(KeystoreError::BadField {
            field,
            reason: format!("longer than {max_bytes} bytes"),
        });
    }
    hex::decode(digits).map_err(|_| KeystoreError::BadField {
        field,
        reason: "not hex".into(),
    })
}

fn format_uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_KEY: &str = "7a28b5ba57c53603b0b07b56bba752f7784bf506fa95edc395f5cf6c7514fe9d";

    /// The PBKDF2 test vector of the Web3 Secret Storage Definition.
    const PBKDF2_VECTOR: &str = r#"{
        "crypto" : {
            "cipher" : "aes-128-ctr",
            "cipherparams" : { "iv" : "6087dab2f9fdbbfaddc31a909735c1e6" },
            "ciphertext" : "5318b4d5bcd28de64ee5559e671353e16f075ecae9f99c7a79a38af5f869aa46",
            "kdf" : "pbkdf2",
            "kdfparams" : {
                "c" : 262144,
                "dklen" : 32,
                "prf" : "hmac-sha256",
                "salt" : "ae3cd4e7013836a3df6bd7241b12db061dbe2c6785853cce422d148a624ce0bd"
            },
            "mac" : "517ead924a9d0dc3124507e3393d175ce3ff7c1e96529c6c555ce9e51205e9b2"
        },
        "id" : "3198bc9c-6672-5ab3-d995-4942343ae5b6",
        "version" : 3
    }"#;

    /// The scrypt test vector of the Web3 Secret Storage Definition.
    const SCRYPT_VECTOR: &str = r#"{
        "crypto" : {
            "cipher" : "aes-128-ctr",
            "cipherparams" : { "iv" : "83dbcc02d8ccb40e466191a123791e0e" },
            "ciphertext" : "d172bf743a674da9cdad04534d56926ef8358534d458fffccd4e6ad2fbde479c",
            "kdf" : "scrypt",
            "kdfparams" : {
                "dklen" : 32,
                "n" : 262144,
                "r" : 1,
                "p" : 8,
                "salt" : "ab0c7876052600dd703518d6fc3fe8984592145b591fc8fb5c6d43190334ba19"
            },
            "mac" : "2103ac29920d71da29f15d75b4a16dbe95cfd7ff8faea1056c33131d846e3097"
        },
        "id" : "3198bc9c-6672-5ab3-d995-4942343ae5b6",
        "version" : 3
    }"#;

    #[test]
    fn pbkdf2_vector_decrypts_to_the_known_key() {
        let key = decrypt(PBKDF2_VECTOR, b"testpassword").unwrap();
        assert_eq!(hex::encode(key.to_bytes()), VECTOR_KEY);
        assert!(matches!(
            decrypt(PBKDF2_VECTOR, b"testpassworD"),
            Err(KeystoreError::WrongPassword)
        ));
    }

    #[test]
    fn scrypt_vector_decrypts_to_the_known_key() {
        let key = decrypt(SCRYPT_VECTOR, b"testpassword").unwrap();
        assert_eq!(hex::encode(key.to_bytes()), VECTOR_KEY);
        assert_eq!(
            key.node_id().0,
            <[u8; 20]>::try_from(hex::decode("008aeeda4d805471df9b2a5b0f38a0c3bcba786b").unwrap())
                .unwrap()
        );
    }

    #[test]
    fn round_trip_and_wrong_password() {
        let key = SecretKey::generate();
        let json = encrypt(&key, b"correct horse", ScryptParams::INSECURE_TEST).unwrap();
        assert_eq!(address(&json).unwrap(), Some(key.node_id()));
        let back = decrypt(&json, b"correct horse").unwrap();
        assert_eq!(*back.to_bytes(), *key.to_bytes());
        let err = decrypt(&json, b"battery staple").unwrap_err();
        assert!(matches!(err, KeystoreError::WrongPassword));
        assert_eq!(
            err.to_string(),
            "wrong password or corrupt keystore: the MAC check failed"
        );
        // The file has the fields other wallets expect.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["version"], 3);
        assert_eq!(value["crypto"]["kdf"], "scrypt");
        assert_eq!(value["crypto"]["kdfparams"]["n"], 1024);
        let id = value["id"].as_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn tampered_files_are_rejected() {
        let key = SecretKey::generate();
        let json = encrypt(&key, b"pw", ScryptParams::INSECURE_TEST).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let ct = value["crypto"]["ciphertext"].as_str().unwrap().to_string();
        let flipped = format!("{}{}", if &ct[..1] == "0" { "1" } else { "0" }, &ct[1..]);
        value["crypto"]["ciphertext"] = flipped.into();
        assert!(matches!(
            decrypt(&value.to_string(), b"pw"),
            Err(KeystoreError::WrongPassword)
        ));

        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["address"] = "0000000000000000000000000000000000000001".into();
        assert!(matches!(
            decrypt(&value.to_string(), b"pw"),
            Err(KeystoreError::AddressMismatch { .. })
        ));

        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["version"] = 1.into();
        assert!(matches!(
            decrypt(&value.to_string(), b"pw"),
            Err(KeystoreError::UnsupportedVersion(1))
        ));

        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["crypto"]["cipher"] = "aes-128-cbc".into();
        assert!(matches!(
            decrypt(&value.to_string(), b"pw"),
            Err(KeystoreError::UnsupportedCipher(_))
        ));

        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["crypto"]["kdf"] = "argon2".into();
        assert!(matches!(
            decrypt(&value.to_string(), b"pw"),
            Err(KeystoreError::UnsupportedKdf(_))
        ));

        assert!(matches!(decrypt("{}", b"pw"), Err(KeystoreError::Json(_))));
        assert!(matches!(
            decrypt("not json", b"pw"),
            Err(KeystoreError::Json(_))
        ));
        let huge = " ".repeat(MAX_KEYSTORE_BYTES + 1);
        assert!(matches!(
            decrypt(&huge, b"pw"),
            Err(KeystoreError::TooLarge { .. })
        ));
    }

    #[test]
    fn hostile_kdf_parameters_are_refused_before_deriving() {
        for (n, r, p) in [
            (1u64 << 40, 8u64, 1u64),
            (1 << 20, 8, 64),
            (1000, 8, 1),
            (1 << 10, 0, 1),
        ] {
            let mut value: serde_json::Value = serde_json::from_str(SCRYPT_VECTOR).unwrap();
            value["crypto"]["kdfparams"]["n"] = n.into();
            value["crypto"]["kdfparams"]["r"] = r.into();
            value["crypto"]["kdfparams"]["p"] = p.into();
            let err = decrypt(&value.to_string(), b"testpassword").unwrap_err();
            assert!(
                matches!(
                    err,
                    KeystoreError::TooCostly { .. } | KeystoreError::BadField { .. }
                ),
                "{n} {r} {p}: {err}"
            );
        }
        let mut value: serde_json::Value = serde_json::from_str(PBKDF2_VECTOR).unwrap();
        value["crypto"]["kdfparams"]["c"] = (u64::from(u32::MAX) + 1).into();
        assert!(matches!(
            decrypt(&value.to_string(), b"testpassword"),
            Err(KeystoreError::TooCostly { .. })
        ));
        value["crypto"]["kdfparams"]["c"] = 1.into();
        value["crypto"]["kdfparams"]["prf"] = "hmac-sha512".into();
        assert!(matches!(
            decrypt(&value.to_string(), b"testpassword"),
            Err(KeystoreError::UnsupportedPrf(_))
        ));
    }

    #[test]
    fn capitalised_crypto_field_is_accepted() {
        let json = SCRYPT_VECTOR.replace("\"crypto\"", "\"Crypto\"");
        // Only parse: the scrypt vector itself is exercised above.
        let file = parse(&json).unwrap();
        assert_eq!(file.crypto.kdf, "scrypt");
    }
}
