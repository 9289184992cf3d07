//! ed25519 signing of bundle manifests. The manifest pins the ONNX file and golden set by SHA-256, so one signature
//! over the manifest's exact bytes covers the whole bundle.
//!
//! Keys are stored as PKCS#8 / SPKI PEM files, the format `openssl genpkey -algorithm ed25519` writes, so operators can
//! inspect and create them with tools they already trust.

use super::BundleError;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding,
};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The detached signature file's content (`manifest.sig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Always `ed25519`.
    pub algorithm: String,
    /// [`key_id`] of the public key that verifies it.
    pub key_id: String,
    /// Base64 of the 64-byte signature over the manifest file's bytes.
    pub signature: String,
}

/// Short, stable identifier of a public key: the first 16 hex digits of the SHA-256 of its 32 raw bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Signs manifest bytes.
pub fn sign_manifest(key: &SigningKey, manifest_bytes: &[u8]) -> SignatureFile {
    SignatureFile {
        algorithm: "ed25519".into(),
        key_id: key_id(&key.verifying_key()),
        signature: BASE64.encode(key.sign(manifest_bytes).to_bytes()),
    }
}

/// A set of public keys a node accepts bundles from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        Self { keys: keys.into_iter().map(|k| (key_id(&k), k)).collect() }
    }

    /// Loads each PEM public key file.
    pub fn from_files<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Result<Self, BundleError> {
        let keys = paths.into_iter().map(|p| read_public_key(p.as_ref())).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Verifies a signature file against the manifest bytes; returns the key id that verified it.
    pub fn verify(&self, manifest_bytes: &[u8], sig: &SignatureFile) -> Result<String, BundleError> {
        if sig.algorithm != "ed25519" {
            return Err(BundleError::BadSignature(format!("unsupported signature algorithm {:?}", sig.algorithm)));
        }
        let Some((id, key)) = self.keys.iter().find(|(id, _)| *id == sig.key_id) else {
            return Err(BundleError::UntrustedKey {
                key_id: sig.key_id.clone(),
                trusted: self.keys.iter().map(|(id, _)| id.clone()).collect(),
            });
        };
        let raw = BASE64
            .decode(sig.signature.trim())
            .map_err(|e| BundleError::BadSignature(format!("signature is not base64: {e}")))?;
        let signature = Signature::from_slice(&raw)
            .map_err(|_| BundleError::BadSignature(format!("signature is {} bytes, expected 64", raw.len())))?;
        key.verify(manifest_bytes, &signature).map_err(|_| {
            BundleError::BadSignature(format!(
                "signature by key {id} does not match the manifest (the manifest or a file it pins was changed after signing)"
            ))
        })?;
        Ok(id.clone())
    }
}

/// Reads an ed25519 public key (SPKI PEM, `-----BEGIN PUBLIC KEY-----`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, BundleError> {
    let pem = std::fs::read_to_string(path).map_err(|source| BundleError::Io { path: path.to_path_buf(), source })?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| BundleError::Key {
        path: path.to_path_buf(),
        reason: format!("not an ed25519 public key in PEM (SPKI) form: {e}"),
    })
}

/// Reads an ed25519 private key (PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, BundleError> {
    let pem = std::fs::read_to_string(path).map_err(|source| BundleError::Io { path: path.to_path_buf(), source })?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| BundleError::Key {
        path: path.to_path_buf(),
        reason: format!("not an ed25519 private key in PEM (PKCS#8) form: {e}"),
    })
}

/// Writes `<stem>.key` (private, mode 0600) and `<stem>.pub`; refuses to overwrite an existing private key.
pub fn write_keypair(key: &SigningKey, stem: &Path) -> Result<(PathBuf, PathBuf), BundleError> {
    let private = stem.with_extension("key");
    let public = stem.with_extension("pub");
    let key_err = |path: &Path, e: String| BundleError::Key { path: path.to_path_buf(), reason: e };
    let priv_pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| key_err(&private, e.to_string()))?;
    let pub_pem = key.verifying_key().to_public_key_pem(LineEnding::LF).map_err(|e| key_err(&public, e.to_string()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    let mut f = opts.open(&private).map_err(io(&private))?;
    std::io::Write::write_all(&mut f, priv_pem.as_bytes()).map_err(io(&private))?;
    std::fs::write(&public, pub_pem).map_err(io(&public))?;
    Ok((private, public))
}
