//! Model bundle v1: the only contract between the trainer and the daemon.
//!
//! A bundle is a directory (or a `.tar` of one, for shipping) holding
//! - `manifest.json` — [`Manifest`]: input spec, heads, hashes;
//! - `manifest.sig` — detached ed25519 signature over the manifest's bytes ([`SignatureFile`]);
//! - the ONNX graph named by `manifest.onnx.file` (conventionally `model.onnx`);
//! - optionally the golden set: an index (`manifest.golden.file`) and images under `golden/`.
//!
//! This module is the only code that knows these file names and how they relate; everything else goes through
//! [`Bundle`].

mod archive;
mod manifest;
mod sign;

pub use archive::{MAX_BUNDLE_BYTES, pack_tar, unpack_tar, unpack_tar_checked};
pub use manifest::{
    AppliesTo, FileRef, GoldenItem, GoldenRef, GoldenSet, Head, HeadKind, Manifest, Precision, SCHEMA_VERSION,
    TrainingData,
};
pub use sign::{SignatureFile, TrustedKeys, key_id, read_public_key, read_signing_key, sign_manifest, write_keypair};

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

const MANIFEST_FILE: &str = "manifest.json";
const SIGNATURE_FILE: &str = "manifest.sig";
const GOLDEN_DIR: &str = "golden";
/// The ONNX file name `write` uses; manifests may name another.
pub const DEFAULT_ONNX_FILE: &str = "model.onnx";
const GOLDEN_INDEX_FILE: &str = "golden.json";
/// Manifests are small; anything bigger is not one of ours.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a bundle: it has no {MANIFEST_FILE}")]
    NotABundle { path: PathBuf },
    #[error("{path}: manifest is not valid JSON for schema v{SCHEMA_VERSION}: {source}")]
    ManifestJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest schema version {found} is not supported (this build reads version {supported})")]
    UnsupportedSchema { found: u32, supported: u32 },
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error("{file}: SHA-256 is {actual} but the manifest says {expected} (file corrupted or replaced)")]
    HashMismatch { file: String, expected: String, actual: String },
    #[error("bundle is not signed ({SIGNATURE_FILE} is missing)")]
    Unsigned,
    #[error("{SIGNATURE_FILE} is malformed: {0}")]
    MalformedSignature(String),
    #[error("signature check failed: {0}")]
    BadSignature(String),
    #[error("bundle is signed by key {key_id}, which is not trusted (trusted: {})", if trusted.is_empty() { "none configured".to_string() } else { trusted.join(", ") })]
    UntrustedKey { key_id: String, trusted: Vec<String> },
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("golden set: {0}")]
    Golden(String),
    #[error("unsafe or malformed bundle archive: {0}")]
    Archive(String),
    /// A shipped archive holds another bundle than the one it was announced as.
    #[error("the archive holds {got}, but {expected} was announced")]
    NotAsAnnounced { expected: String, got: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

/// A bundle directory whose manifest parsed, validated, and whose files match their hashes.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    onnx_sha256: String,
}

/// What signature verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureStatus {
    /// Verified by the trusted key with this id.
    Verified { key_id: String },
    /// The caller chose not to verify (development only; the daemon never does this).
    NotChecked,
}

/// A bundle directory whose manifest was read and validated, and nothing else: its signature can be checked
/// before [`Bundle::open`] hashes the ONNX and golden files, which for an untrusted archive is work an attacker
/// chooses (thousands of golden items can all name one large file).
#[derive(Debug, Clone)]
pub struct Unopened {
    dir: PathBuf,
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
}

impl Unopened {
    pub fn read(dir: impl AsRef<Path>) -> Result<Self, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = match read_limited(&manifest_path, MAX_MANIFEST_BYTES) {
            Ok(b) => b,
            Err(BundleError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::NotABundle { path: dir });
            }
            Err(e) => return Err(e),
        };
        let manifest = parse_manifest(&manifest_bytes).map_err(|e| match e {
            ParseError::Json(source) => BundleError::ManifestJson { path: manifest_path.clone(), source },
            ParseError::Bundle(b) => b,
        })?;
        Ok(Self { dir, manifest, manifest_bytes })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Checks `manifest.sig` against the trusted keys, as [`Bundle::verify`] does.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<SignatureStatus, BundleError> {
        verify_at(&self.dir, &self.manifest_bytes, trusted)
    }
}

fn verify_at(dir: &Path, manifest_bytes: &[u8], trusted: &TrustedKeys) -> Result<SignatureStatus, BundleError> {
    let sig = signature_at(dir)?.ok_or(BundleError::Unsigned)?;
    let key_id = trusted.verify(manifest_bytes, &sig)?;
    Ok(SignatureStatus::Verified { key_id })
}

fn signature_at(dir: &Path) -> Result<Option<SignatureFile>, BundleError> {
    let path = dir.join(SIGNATURE_FILE);
    match read_limited(&path, 64 << 10) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| BundleError::MalformedSignature(e.to_string())),
        Err(BundleError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Bundle {
    /// Opens a bundle directory: parses and validates the manifest and checks the ONNX and golden files against the
    /// hashes it pins. Does not check the signature (see [`Bundle::verify`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, BundleError> {
        let Unopened { dir, manifest, manifest_bytes } = Unopened::read(dir)?;
        let onnx_sha256 = sha256_file(&dir.join(&manifest.onnx.file))?;
        if onnx_sha256 != manifest.onnx.sha256 {
            return Err(BundleError::HashMismatch {
                file: manifest.onnx.file.clone(),
                expected: manifest.onnx.sha256.clone(),
                actual: onnx_sha256,
            });
        }
        let bundle = Self { dir, manifest, manifest_bytes, onnx_sha256 };
        bundle.golden()?;
        Ok(bundle)
    }

    /// Checks `manifest.sig` against the trusted keys.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<SignatureStatus, BundleError> {
        verify_at(&self.dir, &self.manifest_bytes, trusted)
    }

    /// The detached signature, if the bundle has one.
    pub fn signature(&self) -> Result<Option<SignatureFile>, BundleError> {
        signature_at(&self.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest file's exact bytes (what the signature covers).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    pub fn onnx_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.onnx.file)
    }

    /// SHA-256 of the ONNX file, as verified when the bundle was opened.
    pub fn onnx_sha256(&self) -> &str {
        &self.onnx_sha256
    }

    /// `name@version`, how logs and status messages name a bundle.
    pub fn label(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }

    /// The golden set, with every image present and matching its hash, and probability vectors that fit the heads.
    pub fn golden(&self) -> Result<Option<GoldenSet>, BundleError> {
        let Some(golden) = &self.manifest.golden else { return Ok(None) };
        let path = self.dir.join(&golden.file);
        let bytes = read_limited(&path, 64 << 20)?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != golden.sha256 {
            return Err(BundleError::HashMismatch {
                file: golden.file.clone(),
                expected: golden.sha256.clone(),
                actual,
            });
        }
        let set: GoldenSet = serde_json::from_slice(&bytes).map_err(|e| BundleError::Golden(e.to_string()))?;
        if !(set.tolerance.is_finite() && set.tolerance >= 0.0) {
            return Err(BundleError::Golden(format!("tolerance {} must be a non-negative number", set.tolerance)));
        }
        if let Some(t) = set.cpu_tolerance
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(BundleError::Golden(format!("cpu_tolerance {t} must be a non-negative number")));
        }
        if set.items.is_empty() {
            return Err(BundleError::Golden("has no items".into()));
        }
        for item in &set.items {
            manifest::check_golden_path(&item.file)?;
            let actual = sha256_file(&self.dir.join(&item.file))?;
            if actual != item.sha256 {
                return Err(BundleError::HashMismatch {
                    file: item.file.clone(),
                    expected: item.sha256.clone(),
                    actual,
                });
            }
            self.check_probabilities(&item.file, "probabilities", &item.probabilities)?;
            match (&item.cpu_probabilities, set.cpu_tolerance) {
                (Some(p), Some(_)) => self.check_probabilities(&item.file, "cpu_probabilities", p)?,
                (None, None) => {}
                (Some(_), None) => {
                    return Err(BundleError::Golden(format!(
                        "{}: cpu_probabilities without the set's cpu_tolerance",
                        item.file
                    )));
                }
                (None, Some(_)) => {
                    return Err(BundleError::Golden(format!(
                        "{}: no cpu_probabilities, but the set has a cpu_tolerance",
                        item.file
                    )));
                }
            }
        }
        Ok(Some(set))
    }

    /// One probability vector per head, each with one finite value per class.
    fn check_probabilities(
        &self,
        file: &str,
        what: &str,
        probabilities: &BTreeMap<String, Vec<f32>>,
    ) -> Result<(), BundleError> {
        for head in &self.manifest.heads {
            match probabilities.get(&head.name) {
                Some(p) if p.len() == head.classes.len() && p.iter().all(|v| v.is_finite()) => {}
                Some(p) => {
                    return Err(BundleError::Golden(format!(
                        "{file}: {} {what} for head {:?} with {} classes (or non-finite values)",
                        p.len(),
                        head.name,
                        head.classes.len()
                    )));
                }
                None => return Err(BundleError::Golden(format!("{file}: no {what} for head {:?}", head.name))),
            }
        }
        Ok(())
    }

    /// Absolute path of a golden item's image.
    pub fn golden_image_path(&self, item: &GoldenItem) -> PathBuf {
        self.dir.join(&item.file)
    }

    /// The ONNX file's bytes, checked against the manifest's hash as they are read. Sessions are built from these
    /// bytes, not from the path: a file changed after [`Bundle::open`] verified it is refused, never loaded.
    pub fn read_onnx(&self) -> Result<Vec<u8>, BundleError> {
        let file = &self.manifest.onnx.file;
        read_verified(&self.dir.join(file), file, &self.manifest.onnx.sha256)
    }

    /// A golden image's bytes, checked against its hash as they are read (see [`Bundle::read_onnx`]).
    pub fn read_golden_image(&self, item: &GoldenItem) -> Result<Vec<u8>, BundleError> {
        read_verified(&self.golden_image_path(item), &item.file, &item.sha256)
    }
}

fn read_verified(path: &Path, file: &str, expected: &str) -> Result<Vec<u8>, BundleError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let actual = sha256_bytes(&bytes);
    if actual != expected {
        return Err(BundleError::HashMismatch { file: file.to_string(), expected: expected.to_string(), actual });
    }
    Ok(bytes)
}

enum ParseError {
    Json(serde_json::Error),
    Bundle(BundleError),
}

fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ParseError> {
    // Read the schema version first so that a v2 manifest is reported as such instead of as "unknown field".
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        schema_version: u32,
    }
    let v: VersionOnly = serde_json::from_slice(bytes).map_err(ParseError::Json)?;
    if v.schema_version != SCHEMA_VERSION {
        return Err(ParseError::Bundle(BundleError::UnsupportedSchema {
            found: v.schema_version,
            supported: SCHEMA_VERSION,
        }));
    }
    let m: Manifest = serde_json::from_slice(bytes).map_err(ParseError::Json)?;
    m.validate().map_err(ParseError::Bundle)?;
    Ok(m)
}

/// Parses and validates manifest JSON without any files (for tools and fuzzing).
pub fn parse_manifest_bytes(bytes: &[u8]) -> Result<Manifest, BundleError> {
    parse_manifest(bytes).map_err(|e| match e {
        ParseError::Json(source) => BundleError::ManifestJson { path: PathBuf::from(MANIFEST_FILE), source },
        ParseError::Bundle(b) => b,
    })
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, BundleError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(io_err(path))?;
    if buf.len() as u64 > limit {
        return Err(BundleError::InvalidManifest(format!("{} is larger than {limit} bytes", path.display())));
    }
    Ok(buf)
}

/// Lowercase hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(hex::encode(h.finalize()))
}

/// What goes into a new bundle.
pub struct NewBundle<'a> {
    /// The manifest; `onnx` and `golden` references are filled in by [`write`].
    pub manifest: Manifest,
    /// The ONNX graph to copy in.
    pub onnx: &'a Path,
    /// Golden images (source path, file name inside `golden/`) and the set's index; item paths/hashes are filled in.
    pub golden: Option<(Vec<(PathBuf, String)>, GoldenSet)>,
    /// Key to sign the manifest with; `None` writes an unsigned bundle (only useful for tests and local experiments).
    pub signing_key: Option<&'a ed25519_dalek::SigningKey>,
}

/// Writes a bundle into `dir` (created; must not exist or be empty), proving it valid by opening it.
/// The directory is first assembled under a temporary name beside `dir` and renamed into place, so a watcher never
/// sees half a bundle.
pub fn write(dir: &Path, new: NewBundle<'_>) -> Result<Bundle, BundleError> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let staging = tempfile::Builder::new().prefix(".bundle-staging-").tempdir_in(parent).map_err(io_err(parent))?;
    let s = staging.path();
    let mut manifest = new.manifest;

    let onnx_dest = s.join(DEFAULT_ONNX_FILE);
    std::fs::copy(new.onnx, &onnx_dest).map_err(io_err(new.onnx))?;
    manifest.onnx = FileRef { file: DEFAULT_ONNX_FILE.into(), sha256: sha256_file(&onnx_dest)? };

    manifest.golden = match new.golden {
        None => None,
        Some((images, mut set)) => {
            std::fs::create_dir_all(s.join(GOLDEN_DIR)).map_err(io_err(s))?;
            if images.len() != set.items.len() {
                return Err(BundleError::Golden(format!("{} images for {} items", images.len(), set.items.len())));
            }
            for ((src, name), item) in images.iter().zip(set.items.iter_mut()) {
                let rel = format!("{GOLDEN_DIR}/{name}");
                manifest::check_golden_path(&rel)?;
                let dest = s.join(&rel);
                std::fs::copy(src, &dest).map_err(io_err(src))?;
                item.file = rel;
                item.sha256 = sha256_file(&dest)?;
            }
            let bytes = serde_json::to_vec_pretty(&set).map_err(|e| BundleError::Golden(e.to_string()))?;
            let index = s.join(GOLDEN_INDEX_FILE);
            std::fs::write(&index, &bytes).map_err(io_err(&index))?;
            Some(GoldenRef { file: GOLDEN_INDEX_FILE.into(), sha256: hex::encode(Sha256::digest(&bytes)) })
        }
    };
    manifest.validate()?;
    let mut manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BundleError::InvalidManifest(format!("cannot serialize: {e}")))?;
    manifest_bytes.push(b'\n');
    let mpath = s.join(MANIFEST_FILE);
    std::fs::write(&mpath, &manifest_bytes).map_err(io_err(&mpath))?;
    if let Some(key) = new.signing_key {
        let sig = sign_manifest(key, &manifest_bytes);
        let spath = s.join(SIGNATURE_FILE);
        let json = serde_json::to_vec_pretty(&sig).map_err(|e| BundleError::MalformedSignature(e.to_string()))?;
        std::fs::write(&spath, json).map_err(io_err(&spath))?;
    }
    if dir.exists() {
        // rename() onto an empty directory is allowed on Linux; a non-empty one is an error we report as such.
        if std::fs::read_dir(dir).map_err(io_err(dir))?.next().is_some() {
            return Err(BundleError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "destination exists and is not empty"),
            });
        }
    }
    // Proven valid before it is moved into place, so a refused bundle leaves nothing behind (the staging
    // directory is removed on drop). The rename moves those very files, so the opened bundle only changes its path.
    let mut bundle = Bundle::open(s)?;
    let staged = staging.keep();
    if let Err(source) = std::fs::rename(&staged, dir) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(BundleError::Io { path: dir.to_path_buf(), source });
    }
    bundle.dir = dir.to_path_buf();
    Ok(bundle)
}

/// The file names a bundle may contain at its top level, for the archive reader.
fn is_known_top_level(name: &str) -> bool {
    matches!(name, MANIFEST_FILE | SIGNATURE_FILE | GOLDEN_DIR)
        || name.ends_with(".onnx")
        || name.ends_with(".json")
        || name == "README.md"
}

/// Lowercase hex SHA-256 of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
