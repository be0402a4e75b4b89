//! The domain's state kept across restarts: the newest operator-signed manifest this node has
//! verified and the revocations it has verified, in `<state_dir>/manifest.bin` and
//! `<state_dir>/revocations.bin` (length-prefixed frames of signed revocations).
//!
//! Files are written to a temporary name, synced and renamed, by one writer task that always
//! writes the latest state (older pending states are skipped). On load every value is checked
//! again by the membership machine, so a damaged or forged file costs nothing but a log line.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use gaia_protocol::Signed;
use gaia_protocol::Wire;
use gaia_protocol::codec::{FRAME_HEADER_LEN, encode_frame, frame_len};
use gaia_protocol::domain::{DomainManifest, MAX_CERTIFICATE_BYTES, Revocation};
use tokio::sync::watch;

/// What is persisted.
#[derive(Debug, Clone, Default)]
pub struct DomainState {
    /// The newest verified manifest.
    pub manifest: Option<Signed<DomainManifest>>,
    /// The verified revocations.
    pub revocations: Vec<Signed<Revocation>>,
}

const MANIFEST_FILE: &str = "manifest.bin";
const REVOCATIONS_FILE: &str = "revocations.bin";

/// Reads the persisted state of `dir`; missing files are an empty state, damaged values are
/// skipped (with a warning).
pub fn load(dir: &Path) -> DomainState {
    let manifest = match std::fs::read(dir.join(MANIFEST_FILE)) {
        Ok(bytes) => match Signed::<DomainManifest>::from_bytes(&bytes) {
            Ok(m) => Some(m),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "ignoring a damaged saved manifest");
                None
            }
        },
        Err(_) => None,
    };
    let mut revocations = Vec::new();
    if let Ok(bytes) = std::fs::read(dir.join(REVOCATIONS_FILE)) {
        let mut rest = &bytes[..];
        while rest.len() >= FRAME_HEADER_LEN {
            let header: [u8; FRAME_HEADER_LEN] = rest[..FRAME_HEADER_LEN]
                .try_into()
                .unwrap_or([0; FRAME_HEADER_LEN]);
            let Ok(len) = frame_len(header, MAX_CERTIFICATE_BYTES) else {
                break;
            };
            let Some(body) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
                break;
            };
            match Signed::<Revocation>::from_bytes(body) {
                Ok(r) => revocations.push(r),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "skipping a damaged saved revocation");
                }
            }
            rest = &rest[FRAME_HEADER_LEN + len..];
        }
        if !rest.is_empty() {
            tracing::warn!(dir = %dir.display(), bytes = rest.len(), "the saved revocations end in a damaged record");
        }
    }
    DomainState {
        manifest,
        revocations,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("bin.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Writes `state` into `dir`.
pub fn save(dir: &Path, state: &DomainState) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if let Some(manifest) = &state.manifest {
        let bytes = manifest.to_bytes().map_err(std::io::Error::other)?;
        write_atomic(&dir.join(MANIFEST_FILE), &bytes)?;
    }
    let mut out = Vec::new();
    for revocation in &state.revocations {
        out.extend_from_slice(&encode_frame(revocation).map_err(std::io::Error::other)?);
    }
    write_atomic(&dir.join(REVOCATIONS_FILE), &out)
}

/// Starts the writer task for `dir`: send states on the returned channel; the latest one is
/// written.
pub fn writer(dir: PathBuf) -> watch::Sender<Option<DomainState>> {
    let (tx, mut rx) = watch::channel::<Option<DomainState>>(None);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some(state) = rx.borrow_and_update().clone() else {
                continue;
            };
            let dir = dir.clone();
            let result = tokio::task::spawn_blocking(move || save(&dir, &state)).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot save the domain's state; it is kept in memory")
                }
                Err(_) => break,
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::test_support::{key, revocation};
    use gaia_protocol::domain::DomainId;

    #[test]
    fn state_round_trips_and_damage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let operator = key(1);
        let manifest = Signed::sign(
            gaia_protocol::test_utils::sample_manifest(&operator),
            &operator,
        )
        .unwrap();
        let domain = DomainId([7; 32]);
        let state = DomainState {
            manifest: Some(manifest.clone()),
            revocations: (2..6)
                .map(|i| revocation(&operator, domain, key(i).node_id(), u64::from(i)))
                .collect(),
        };
        save(dir.path(), &state).unwrap();
        let back = load(dir.path());
        assert_eq!(back.manifest, Some(manifest));
        assert_eq!(back.revocations, state.revocations);

        // A torn last record and a garbage manifest: the rest survives.
        let path = dir.path().join(REVOCATIONS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(dir.path().join(MANIFEST_FILE), b"junk").unwrap();
        let back = load(dir.path());
        assert!(back.manifest.is_none());
        assert_eq!(back.revocations, state.revocations[..3]);
        // Nothing there at all.
        let empty = load(&dir.path().join("missing"));
        assert!(empty.manifest.is_none() && empty.revocations.is_empty());
    }
}
