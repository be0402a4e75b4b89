//! `gaia domain create|admit|revoke|show`: the operator's side of a domain.
//!
//! The operator's node key signs a [`DomainManifest`], the [`MembershipCertificate`]s that
//! admit nodes and the [`Revocation`]s that expel them. Each is written as a file (the
//! protocol's canonical encoding) that the operator hands to members: a member starts with
//! `swarm.domain = "<manifest file>"` and `swarm.certificate = "<certificate file>"`; a running
//! member publishes revocations to the domain over gossip
//! ([`crate::swarm::SwarmHandle::publish_revocation`]).
//!
//! Files live in `<data_dir>/domains/<name>/`: `manifest.bin`, `certs/<address>.bin`,
//! `revocations/<address>-<serial>.bin`, and `next_serial` (the next certificate serial).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use gaia_protocol::domain::{
    Admission, DomainManifest, MembershipCertificate, Pricing, Requirements, Revocation,
};
use gaia_protocol::keystore;
use gaia_protocol::payment::Price;
use gaia_protocol::{ContentHash, NodeId, SecretKey, Signed, Wire};

use crate::start::{KEY_FILE, PASSWORD_ENV, PASSWORD_FILE};

/// `gaia domain ...`
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Create a domain: sign its manifest with this node's key (this node is the operator).
    Create(CreateArgs),
    /// Admit a node: add it to the allow list (allow-list domains) and sign its certificate.
    Admit(AdmitArgs),
    /// Revoke a node's certificate (and add it to the deny list of deny-list domains).
    Revoke(RevokeArgs),
    /// Set (or remove) the domain's prices and the operator's share: a new manifest version.
    Price(PriceArgs),
    /// Verify and print a manifest, certificate or revocation file.
    Show(ShowArgs),
}

/// Who may join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Anyone who runs an accepted model.
    Open,
    /// Only the nodes admitted with `gaia domain admit`.
    Allow,
    /// Anyone except the nodes revoked with `gaia domain revoke`.
    Deny,
}

/// Where the operator key comes from.
#[derive(Debug, Args, Default)]
pub struct KeyArgs {
    /// The operator's keystore v3 file [default: <data_dir>/node.key].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// A file holding the key's password [default: $GAIA_KEY_PASSWORD, else
    /// <data_dir>/node.key.password].
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

/// `gaia domain create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The domain's name (unique per operator).
    pub name: String,
    /// The gossip topic its members publish adverts on [default: /gaia/domain/<id>/adverts].
    #[arg(long)]
    pub topic: Option<String>,
    /// Who may join.
    #[arg(long, value_enum, default_value_t = Policy::Allow)]
    pub policy: Policy,
    /// An accepted model (sha256 of the GGUF file, hex); repeatable [default: the default chat
    /// model].
    #[arg(long = "model-hash", value_name = "SHA256")]
    pub model_hashes: Vec<String>,
    /// The knowledge-base snapshot every member must serve (hex).
    #[arg(long, value_name = "SHA256")]
    pub kb_hash: Option<String>,
    /// The system prompt every member must use (hex).
    #[arg(long, value_name = "SHA256")]
    pub prompt_hash: Option<String>,
    /// A multiaddr to join through; repeatable.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// The domain's prices (none: the domain states no price).
    #[command(flatten)]
    pub pricing: PricingArgs,
    /// The operator key.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// The domain's prices and the operator's share.
#[derive(Debug, Args, Default)]
pub struct PricingArgs {
    /// The most a member may ask per 1000 prompt tokens of a paid request, in the chain's
    /// smallest unit (wei); with --completion-price. Paid requests go only to members asking
    /// no more. (A manifest with prices needs Gaia 0.2 nodes: older ones cannot read it.)
    #[arg(long, value_name = "WEI", requires = "completion_price")]
    pub prompt_price: Option<u64>,
    /// The most a member may ask per 1000 completion tokens, in wei; with --prompt-price.
    #[arg(long, value_name = "WEI", requires = "prompt_price")]
    pub completion_price: Option<u64>,
    /// The operator's share of every payout, in basis points (1/10 000): the share the
    /// domain's escrow was deployed with (`gaia pay deploy --share`), which nodes check.
    #[arg(
        long,
        value_name = "BPS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u16).range(0..=10_000)
    )]
    pub operator_share: u16,
}

impl PricingArgs {
    /// The pricing these flags state, `None` without prices.
    fn pricing(&self) -> Option<Pricing> {
        match (self.prompt_price, self.completion_price) {
            (Some(prompt), Some(completion)) => Some(Pricing {
                price: Price { prompt, completion },
                operator_share_bps: self.operator_share,
            }),
            _ => None,
        }
    }
}

/// `gaia domain price`
#[derive(Debug, Args)]
pub struct PriceArgs {
    /// The domain's name.
    pub domain: String,
    /// The new prices; without --prompt-price and --completion-price the domain states no
    /// price any more.
    #[command(flatten)]
    pub pricing: PricingArgs,
    /// Hand the new manifest to the running domain through the member at this multiaddr
    /// (`/ip4/…/tcp/…/p2p/…`), for when the operator's own node is not running; repeatable.
    #[arg(long, value_name = "MULTIADDR")]
    pub to: Vec<String>,
    /// The operator key.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `gaia domain admit`
#[derive(Debug, Args)]
pub struct AdmitArgs {
    /// The node's address (0x…).
    pub address: String,
    /// The domain's name.
    #[arg(long)]
    pub domain: String,
    /// How long the certificate is valid, in days.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub days: u64,
    /// Hand the new domain state (manifest, certificates, revocations) to the running domain
    /// through the member at this multiaddr (`/ip4/…/tcp/…/p2p/…`), for when the operator's own
    /// node is not running; repeatable. Members pass it on to each other.
    #[arg(long, value_name = "MULTIADDR")]
    pub to: Vec<String>,
    /// The operator key.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `gaia domain revoke`
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The node's address (0x…).
    pub address: String,
    /// The domain's name.
    #[arg(long)]
    pub domain: String,
    /// The serial of the certificate to revoke [default: that of the last certificate issued
    /// to the node by this operator].
    #[arg(long)]
    pub serial: Option<u64>,
    /// Hand the new domain state (manifest, certificates, revocations) to the running domain
    /// through the member at this multiaddr (`/ip4/…/tcp/…/p2p/…`), for when the operator's own
    /// node is not running; repeatable. Members pass it on to each other.
    #[arg(long, value_name = "MULTIADDR")]
    pub to: Vec<String>,
    /// The operator key.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `gaia domain show`
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A manifest, certificate or revocation file, or a domain name in the data directory.
    pub what: String,
}

/// Runs a `gaia domain` command.
pub fn run(data_dir: &Path, command: DomainCommand) -> anyhow::Result<()> {
    match command {
        DomainCommand::Create(args) => create(data_dir, args),
        DomainCommand::Admit(args) => admit(data_dir, args),
        DomainCommand::Revoke(args) => revoke(data_dir, args),
        DomainCommand::Price(args) => price(data_dir, args),
        DomainCommand::Show(args) => show(data_dir, &args.what),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The operator key, decrypted.
/// Loads and decrypts a node key (the data directory's, unless `args` names another).
pub fn load_key(data_dir: &Path, args: &KeyArgs) -> anyhow::Result<SecretKey> {
    let path = args.key.clone().unwrap_or_else(|| data_dir.join(KEY_FILE));
    let json = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the operator key {}: run `gaia init` or pass --key",
            path.display()
        )
    })?;
    let password = if let Some(file) = &args.password_file {
        std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the password file {}", file.display()))?
    } else if let Ok(password) = std::env::var(PASSWORD_ENV) {
        password
    } else {
        let file = data_dir.join(PASSWORD_FILE);
        std::fs::read_to_string(&file).with_context(|| {
            format!(
                "no key password: set {PASSWORD_ENV}, pass --password-file, or keep it in {}",
                file.display()
            )
        })?
    };
    let password = password.trim_end_matches(['\r', '\n']);
    keystore::decrypt(&json, password.as_bytes())
        .with_context(|| format!("cannot decrypt {} (wrong password?)", path.display()))
}

fn domain_dir(data_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    if name.is_empty()
        || name.len() > gaia_protocol::domain::MAX_DOMAIN_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        bail!(
            "invalid domain name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', not \
             starting with '.'"
        );
    }
    Ok(data_dir.join("domains").join(name))
}

/// The manifest file of domain `name`.
pub fn manifest_path(data_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    Ok(domain_dir(data_dir, name)?.join("manifest.bin"))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a file of at most `T::MAX_BYTES` and decodes it.
fn read_wire<T: Wire>(path: &Path) -> anyhow::Result<T> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > T::MAX_BYTES as u64 {
        bail!(
            "{} is {len} bytes, more than a {} can be ({} bytes)",
            path.display(),
            T::NAME,
            T::MAX_BYTES
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    T::from_bytes(&bytes).with_context(|| format!("{} is not a valid {}", path.display(), T::NAME))
}

/// Reads and verifies a signed manifest file.
pub fn read_manifest(path: &Path) -> anyhow::Result<Signed<DomainManifest>> {
    let manifest: Signed<DomainManifest> = read_wire(path)?;
    manifest
        .verify()
        .with_context(|| format!("{} is not validly signed", path.display()))?;
    Ok(manifest)
}

/// Reads and verifies a certificate file against `manifest`'s operator.
pub fn read_certificate(
    path: &Path,
    manifest: &DomainManifest,
) -> anyhow::Result<Signed<MembershipCertificate>> {
    let certificate: Signed<MembershipCertificate> = read_wire(path)?;
    certificate
        .verify_signed_by(manifest.operator)
        .with_context(|| format!("{} is not signed by the domain's operator", path.display()))?;
    Ok(certificate)
}

/// Most certificate or revocation files a running operator node publishes per scan.
pub const MAX_PUBLISHED_FILES: usize = 1024;

/// The signed certificates and revocations kept next to a manifest (`certs/*.bin`,
/// `revocations/*.bin`), each verified against `manifest`'s operator, with the file's
/// modification time: what a running operator node publishes to its domain. Unreadable or
/// invalid files are skipped with a warning; at most [`MAX_PUBLISHED_FILES`] of each kind.
pub fn domain_files(
    manifest_path: &Path,
    manifest: &DomainManifest,
) -> Vec<(PathBuf, std::time::SystemTime, DomainFile)> {
    let Some(dir) = manifest_path.parent() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for kind in ["certs", "revocations"] {
        let Ok(entries) = std::fs::read_dir(dir.join(kind)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .take(MAX_PUBLISHED_FILES)
            .collect();
        paths.sort();
        for path in paths {
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let file = if kind == "certs" {
                read_certificate(&path, manifest).map(DomainFile::Certificate)
            } else {
                read_revocation(&path, manifest).map(DomainFile::Revocation)
            };
            match file {
                Ok(file) => out.push((path, modified, file)),
                Err(error) => tracing::warn!(path = %path.display(), error = %format!("{error:#}"),
                    "skipping a domain file that is not valid"),
            }
        }
    }
    out
}

/// A certificate or revocation file of a domain.
#[derive(Debug, Clone)]
pub enum DomainFile {
    /// A membership certificate (`gaia domain admit`).
    Certificate(Signed<MembershipCertificate>),
    /// A revocation (`gaia domain revoke`).
    Revocation(Signed<Revocation>),
}

/// Reads and verifies a revocation file against `manifest`'s operator and domain.
pub fn read_revocation(
    path: &Path,
    manifest: &DomainManifest,
) -> anyhow::Result<Signed<Revocation>> {
    let revocation: Signed<Revocation> = read_wire(path)?;
    revocation
        .verify_signed_by(manifest.operator)
        .with_context(|| format!("{} is not signed by the domain's operator", path.display()))?;
    if revocation.payload.domain != manifest.id() {
        bail!("{} revokes a member of another domain", path.display());
    }
    Ok(revocation)
}

fn parse_hash(text: &str, what: &str) -> anyhow::Result<ContentHash> {
    text.trim()
        .trim_start_matches("0x")
        .parse()
        .with_context(|| format!("--{what} {text:?} is not a sha256 in hex"))
}

fn create(data_dir: &Path, args: CreateArgs) -> anyhow::Result<()> {
    let key = load_key(data_dir, &args.key)?;
    let path = manifest_path(data_dir, &args.name)?;
    if path.exists() {
        bail!(
            "domain {} exists ({}): admit or revoke nodes, or choose another name",
            args.name,
            path.display()
        );
    }
    let mut accepted = args
        .model_hashes
        .iter()
        .map(|h| parse_hash(h, "model-hash"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if accepted.is_empty() {
        accepted.push(parse_hash(
            crate::models::DEFAULT_CHAT.files[0].sha256,
            "model-hash",
        )?);
    }
    let operator = key.node_id();
    let id = gaia_protocol::domain::DomainId::derive(&operator, &args.name);
    let manifest = DomainManifest {
        name: args.name.clone(),
        topic: args.topic.unwrap_or_else(|| id.advert_topic()),
        operator,
        requirements: Requirements {
            accepted_model_hashes: accepted,
            kb_hash: args
                .kb_hash
                .as_deref()
                .map(|h| parse_hash(h, "kb-hash"))
                .transpose()?,
            prompt_hash: args
                .prompt_hash
                .as_deref()
                .map(|h| parse_hash(h, "prompt-hash"))
                .transpose()?,
        },
        bootstrap: args.bootstrap,
        admission: match args.policy {
            Policy::Open => Admission::Open,
            Policy::Allow => Admission::AllowList(Vec::new()),
            Policy::Deny => Admission::DenyList(Vec::new()),
        },
        created_at: unix_now(),
        version: 1,
        pricing: args.pricing.pricing(),
    };
    let signed = Signed::sign(manifest, &key).context("cannot sign the manifest")?;
    write_file(
        &path,
        &signed.to_bytes().context("cannot encode the manifest")?,
    )?;
    println!("domain {} ({id}) created", args.name);
    println!("manifest: {}", path.display());
    println!("operator: {operator}");
    println!("topic:    {}", signed.payload.topic);
    if let Some(pricing) = &signed.payload.pricing {
        println!(
            "price:    {} (operator share {} basis points)",
            pricing.price, pricing.operator_share_bps
        );
    }
    Ok(())
}

/// `gaia domain price`: the next manifest version with the new pricing.
fn price(data_dir: &Path, args: PriceArgs) -> anyhow::Result<()> {
    check_to(&args.to)?;
    let key = load_key(data_dir, &args.key)?;
    let (path, manifest) = operated_manifest(data_dir, &args.domain, &key)?;
    let pricing = args.pricing.pricing();
    bump(&path, &manifest, |m| m.pricing = pricing, &key)?;
    match &pricing {
        Some(p) => println!(
            "{} now charges at most {} (operator share {} basis points)",
            args.domain, p.price, p.operator_share_bps
        ),
        None => println!("{} states no price any more", args.domain),
    }
    if !args.to.is_empty() {
        push(&path, key, &args.to)?;
    }
    Ok(())
}

/// Loads domain `name`'s manifest and checks that `key` is its operator.
fn operated_manifest(
    data_dir: &Path,
    name: &str,
    key: &SecretKey,
) -> anyhow::Result<(PathBuf, Signed<DomainManifest>)> {
    let path = manifest_path(data_dir, name)?;
    if !path.exists() {
        bail!(
            "no domain {name} in {}: run `gaia domain create {name}`",
            data_dir.display()
        );
    }
    let manifest = read_manifest(&path)?;
    if manifest.payload.operator != key.node_id() {
        bail!(
            "domain {name} is operated by {}, not by this key ({})",
            manifest.payload.operator,
            key.node_id()
        );
    }
    Ok((path, manifest))
}

/// Re-signs `manifest` as the next version, changed by `change`.
fn bump(
    path: &Path,
    manifest: &Signed<DomainManifest>,
    change: impl FnOnce(&mut DomainManifest),
    key: &SecretKey,
) -> anyhow::Result<()> {
    let mut next = manifest.payload.clone();
    change(&mut next);
    next.version += 1;
    next.created_at = unix_now();
    let signed = Signed::sign(next, key).context("cannot sign the manifest")?;
    write_file(
        path,
        &signed.to_bytes().context("cannot encode the manifest")?,
    )?;
    println!(
        "manifest version {} written to {}: give it to the members",
        signed.payload.version,
        path.display()
    );
    Ok(())
}

fn next_serial(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join("next_serial");
    let serial = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{} is not a number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    write_file(&path, (serial + 1).to_string().as_bytes())?;
    Ok(serial)
}

fn parse_address(text: &str) -> anyhow::Result<NodeId> {
    text.parse()
        .with_context(|| format!("{text:?} is not a node address (0x followed by 40 hex digits)"))
}

fn admit(data_dir: &Path, args: AdmitArgs) -> anyhow::Result<()> {
    check_to(&args.to)?;
    let key = load_key(data_dir, &args.key)?;
    let member = parse_address(&args.address)?;
    let (path, manifest) = operated_manifest(data_dir, &args.domain, &key)?;
    match &manifest.payload.admission {
        Admission::AllowList(list) if !list.contains(&member) => {
            let mut list = list.clone();
            list.push(member);
            bump(
                &path,
                &manifest,
                |m| m.admission = Admission::AllowList(list),
                &key,
            )?;
        }
        Admission::DenyList(list) if list.contains(&member) => {
            let list = list.iter().copied().filter(|n| *n != member).collect();
            bump(
                &path,
                &manifest,
                |m| m.admission = Admission::DenyList(list),
                &key,
            )?;
        }
        _ => {}
    }
    let dir = domain_dir(data_dir, &args.domain)?;
    let now = unix_now();
    let certificate = MembershipCertificate {
        domain: manifest.payload.id(),
        member,
        issued_at: now,
        expires_at: now.saturating_add(args.days.saturating_mul(86_400)),
        serial: next_serial(&dir)?,
    };
    let signed = Signed::sign(certificate, &key).context("cannot sign the certificate")?;
    let out = dir.join("certs").join(format!("{member}.bin"));
    write_file(
        &out,
        &signed.to_bytes().context("cannot encode the certificate")?,
    )?;
    println!(
        "certificate {} for {member} in {} (valid {} days): {}",
        signed.payload.serial,
        args.domain,
        args.days,
        out.display()
    );
    if !args.to.is_empty() {
        push(&path, key, &args.to)?;
    }
    Ok(())
}

/// Checks the `--to` addresses before anything is written.
fn check_to(to: &[String]) -> anyhow::Result<()> {
    for addr in to {
        addr.parse::<libp2p::Multiaddr>()
            .with_context(|| format!("--to {addr} is not a multiaddr"))?;
    }
    Ok(())
}

/// How long `--to` waits for the member to take the domain's topic.
const PUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Joins the domain of `manifest_path` for a moment through `to` (as the operator, serving
/// nothing) and publishes its manifest, certificates and revocations on the domain's topic.
fn push(manifest_path: &Path, key: SecretKey, to: &[String]) -> anyhow::Result<()> {
    let manifest = read_manifest(manifest_path)?;
    let files = domain_files(manifest_path, &manifest.payload);
    let config = crate::swarm::SwarmConfig {
        listen: vec!["/ip4/0.0.0.0/tcp/0".into()],
        bootstrap: to.to_vec(),
        gateway: true,
        ..crate::swarm::SwarmConfig::default()
    };
    let params = crate::swarm::SwarmParams {
        key,
        config,
        manifest: Some(manifest.clone()),
        certificate: None,
        service: None,
        seed: rand::random(),
        state_dir: None,
        vouchers: None,
        voucher_source: None,
        content: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let running = crate::swarm::spawn(params).await?;
        let handle = running.handle;
        let deadline = std::time::Instant::now() + PUSH_TIMEOUT;
        loop {
            let status = handle.status().await?;
            if status.topic_peers > 0 {
                break;
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "no member of the domain answered at {} within {:?}: check the address and \
                     that the member runs",
                    to.join(", "),
                    PUSH_TIMEOUT
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        handle.publish_manifest(manifest.clone()).await?;
        let (mut certificates, mut revocations) = (0, 0);
        for (_, _, file) in files {
            match file {
                DomainFile::Certificate(c) => {
                    certificates += 1;
                    handle.publish_certificate(c).await?;
                }
                DomainFile::Revocation(r) => {
                    revocations += 1;
                    handle.publish_revocation(r).await?;
                }
            }
        }
        // Let the messages out, and let the member ask for the domain's state.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let _ = handle.shutdown().await;
        println!(
            "handed manifest version {}, {certificates} certificates and {revocations} \
             revocations to the domain through {}",
            manifest.payload.version,
            to.join(", ")
        );
        Ok(())
    })
}

fn revoke(data_dir: &Path, args: RevokeArgs) -> anyhow::Result<()> {
    check_to(&args.to)?;
    let key = load_key(data_dir, &args.key)?;
    let member = parse_address(&args.address)?;
    let (path, manifest) = operated_manifest(data_dir, &args.domain, &key)?;
    let dir = domain_dir(data_dir, &args.domain)?;
    let serial = match args.serial {
        Some(serial) => serial,
        None => {
            let cert_path = dir.join("certs").join(format!("{member}.bin"));
            read_certificate(&cert_path, &manifest.payload)
                .with_context(|| format!("no certificate issued to {member} here: pass --serial"))?
                .payload
                .serial
        }
    };
    let revocation = Revocation {
        domain: manifest.payload.id(),
        member,
        serial,
        revoked_at: unix_now(),
    };
    let signed = Signed::sign(revocation, &key).context("cannot sign the revocation")?;
    let out = dir
        .join("revocations")
        .join(format!("{member}-{serial}.bin"));
    write_file(
        &out,
        &signed.to_bytes().context("cannot encode the revocation")?,
    )?;
    println!(
        "revocation of certificate {serial} of {member}: {}",
        out.display()
    );
    if let Admission::DenyList(list) = &manifest.payload.admission
        && !list.contains(&member)
    {
        let mut list = list.clone();
        list.push(member);
        bump(
            &path,
            &manifest,
            |m| m.admission = Admission::DenyList(list),
            &key,
        )?;
    }
    if !args.to.is_empty() {
        push(&path, key, &args.to)?;
    }
    Ok(())
}

fn show(data_dir: &Path, what: &str) -> anyhow::Result<()> {
    let path = if Path::new(what).is_file() {
        PathBuf::from(what)
    } else {
        manifest_path(data_dir, what)?
    };
    if let Ok(manifest) = read_wire::<Signed<DomainManifest>>(&path) {
        let verified = manifest.verify().is_ok();
        let m = &manifest.payload;
        println!("domain     {} ({})", m.name, m.id());
        println!("operator   {}", m.operator);
        println!("signature  {}", if verified { "valid" } else { "INVALID" });
        println!("version    {} (created at {})", m.version, m.created_at);
        println!("topic      {}", m.topic);
        for hash in &m.requirements.accepted_model_hashes {
            println!("model      {hash}");
        }
        if let Some(kb) = &m.requirements.kb_hash {
            println!("kb         {kb}");
        }
        if let Some(prompt) = &m.requirements.prompt_hash {
            println!("prompt     {prompt}");
        }
        for addr in &m.bootstrap {
            println!("bootstrap  {addr}");
        }
        match &m.admission {
            Admission::Open => println!("admission  open"),
            Admission::AllowList(list) => println!("admission  allow list of {}", list.len()),
            Admission::DenyList(list) => println!("admission  deny list of {}", list.len()),
        }
        match &m.pricing {
            Some(p) => println!(
                "price      {} (operator share {} basis points)",
                p.price, p.operator_share_bps
            ),
            None => println!("price      none stated"),
        }
        return Ok(());
    }
    if let Ok(cert) = read_wire::<Signed<MembershipCertificate>>(&path) {
        let c = &cert.payload;
        println!(
            "certificate {} of {} for domain {}",
            c.serial, c.member, c.domain
        );
        println!(
            "signed by   {} ({})",
            cert.signer,
            verdict(cert.verify().is_ok())
        );
        println!("valid       {} to {}", c.issued_at, c.expires_at);
        return Ok(());
    }
    if let Ok(rev) = read_wire::<Signed<Revocation>>(&path) {
        let r = &rev.payload;
        println!(
            "revocation of certificate {} of {} in domain {}",
            r.serial, r.member, r.domain
        );
        println!(
            "signed by   {} ({})",
            rev.signer,
            verdict(rev.verify().is_ok())
        );
        return Ok(());
    }
    bail!(
        "{} is not a domain manifest, certificate or revocation",
        path.display()
    )
}

fn verdict(valid: bool) -> &'static str {
    if valid {
        "valid signature"
    } else {
        "INVALID signature"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, KeyArgs, SecretKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let json = keystore::encrypt(&key, b"pw", keystore::ScryptParams::INSECURE_TEST).unwrap();
        std::fs::write(dir.path().join(KEY_FILE), json).unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pw\n").unwrap();
        let args = KeyArgs {
            key: None,
            password_file: Some(pw),
        };
        (dir, args, key)
    }

    fn key_args(args: &KeyArgs) -> KeyArgs {
        KeyArgs {
            key: args.key.clone(),
            password_file: args.password_file.clone(),
        }
    }

    #[test]
    fn create_admit_revoke_write_verifiable_files() {
        let (dir, args, key) = setup();
        let data = dir.path();
        create(
            data,
            CreateArgs {
                name: "tutor".into(),
                topic: Some("/gaia/tutor".into()),
                policy: Policy::Allow,
                model_hashes: Vec::new(),
                kb_hash: None,
                prompt_hash: None,
                bootstrap: vec!["/ip4/127.0.0.1/tcp/4001".into()],
                pricing: PricingArgs::default(),
                key: key_args(&args),
            },
        )
        .unwrap();
        let path = manifest_path(data, "tutor").unwrap();
        let manifest = read_manifest(&path).unwrap();
        assert_eq!(manifest.payload.operator, key.node_id());
        assert_eq!(manifest.payload.version, 1);

        let member = SecretKey::generate().node_id();
        admit(
            data,
            AdmitArgs {
                address: member.to_string(),
                domain: "tutor".into(),
                days: 7,
                key: key_args(&args),
                to: Vec::new(),
            },
        )
        .unwrap();
        let manifest = read_manifest(&path).unwrap();
        assert_eq!(manifest.payload.version, 2);
        assert_eq!(
            manifest.payload.admission,
            Admission::AllowList(vec![member])
        );
        let cert_path = data
            .join("domains/tutor/certs")
            .join(format!("{member}.bin"));
        let cert = read_certificate(&cert_path, &manifest.payload).unwrap();
        manifest
            .payload
            .verify_certificate(&cert, unix_now())
            .unwrap();

        revoke(
            data,
            RevokeArgs {
                address: member.to_string(),
                domain: "tutor".into(),
                serial: None,
                key: key_args(&args),
                to: Vec::new(),
            },
        )
        .unwrap();
        let rev_path = data
            .join("domains/tutor/revocations")
            .join(format!("{member}-{}.bin", cert.payload.serial));
        let rev: Signed<Revocation> = read_wire(&rev_path).unwrap();
        manifest.payload.verify_revocation(&rev).unwrap();
        assert!(cert.payload.is_revoked_by(&rev.payload));
        show(data, "tutor").unwrap();
        show(data, rev_path.to_str().unwrap()).unwrap();

        // A second create of the same name and a bad address fail with a clear message.
        let err = create(
            data,
            CreateArgs {
                name: "tutor".into(),
                topic: None,
                policy: Policy::Open,
                model_hashes: Vec::new(),
                kb_hash: None,
                prompt_hash: None,
                bootstrap: Vec::new(),
                pricing: PricingArgs::default(),
                key: key_args(&args),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        let err = parse_address("0x123").unwrap_err();
        assert!(err.to_string().contains("node address"));
        assert!(domain_dir(data, "../x").is_err());

        // Prices come as the next manifest version, still signed by the operator and read
        // back by the node; without prices the manifest keeps the previous layout.
        let path = manifest_path(data, "tutor").unwrap();
        let before = read_manifest(&path).unwrap();
        assert!(before.payload.pricing.is_none());
        let priced = PricingArgs {
            prompt_price: Some(1_000),
            completion_price: Some(4_000),
            operator_share: 1_500,
        };
        price(
            data,
            PriceArgs {
                domain: "tutor".into(),
                pricing: priced,
                to: Vec::new(),
                key: key_args(&args),
            },
        )
        .unwrap();
        let after = read_manifest(&path).unwrap();
        after.verify().unwrap();
        assert_eq!(after.payload.version, before.payload.version + 1);
        assert_eq!(
            after.payload.pricing,
            Some(Pricing {
                price: Price {
                    prompt: 1_000,
                    completion: 4_000
                },
                operator_share_bps: 1_500
            })
        );
        price(
            data,
            PriceArgs {
                domain: "tutor".into(),
                pricing: PricingArgs::default(),
                to: Vec::new(),
                key: key_args(&args),
            },
        )
        .unwrap();
        let unpriced = read_manifest(&path).unwrap();
        assert!(unpriced.payload.pricing.is_none());
        assert!(
            gaia_protocol::layouts::to_v1(&unpriced).is_some(),
            "an unpriced manifest keeps version 1's layout"
        );
    }
}
