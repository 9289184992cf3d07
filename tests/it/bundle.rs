//! Bundle v1: manifest validation, hashes, signatures, archives — against the real ImageNet Lite0 bundle.

use crate::common::{copy_dir, imagenet_bundle, repo};
use attrd::bundle::{self, Bundle, BundleError, Manifest, NewBundle, SignatureStatus, TrustedKeys};
use ed25519_dalek::SigningKey;
use std::path::{Path, PathBuf};

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Writes a new bundle from the ImageNet bundle's ONNX with a (possibly modified) copy of its manifest.
fn rebundle(
    dir: &Path,
    signer: Option<&SigningKey>,
    modify: impl FnOnce(&mut Manifest),
) -> Result<Bundle, BundleError> {
    let src = Bundle::open(imagenet_bundle()).unwrap();
    let mut m = src.manifest().clone();
    modify(&mut m);
    bundle::write(dir, NewBundle { manifest: m, onnx: &src.onnx_path(), golden: None, signing_key: signer })
}

fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest.json")
}

#[test]
fn imagenet_bundle_opens_and_matches_the_json_schema() {
    let b = Bundle::open(imagenet_bundle()).expect("open");
    assert_eq!(b.manifest().heads.len(), 1);
    assert_eq!(b.manifest().heads[0].classes.len(), 1000);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("models/bundle-manifest.schema.json")).unwrap())
            .unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let instance: serde_json::Value = serde_json::from_slice(b.manifest_bytes()).unwrap();
    let errors: Vec<String> = validator.iter_errors(&instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "manifest violates the schema: {errors:?}");

    // The schema must also reject what the Rust side rejects.
    let mut bad = instance.clone();
    bad["surprise"] = serde_json::json!(1);
    assert!(!validator.is_valid(&bad));
    let mut bad = instance;
    bad["heads"][0]["kind"] = serde_json::json!("several");
    assert!(!validator.is_valid(&bad));
}

#[test]
fn signed_bundle_verifies_only_with_the_right_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    let signer = key(7);
    let b = rebundle(&dir, Some(&signer), |_| {}).unwrap();
    let good = TrustedKeys::new([signer.verifying_key()]);
    assert_eq!(b.verify(&good).unwrap(), SignatureStatus::Verified { key_id: bundle::key_id(&signer.verifying_key()) });
    let other = TrustedKeys::new([key(8).verifying_key()]);
    assert!(matches!(b.verify(&other), Err(BundleError::UntrustedKey { .. })));
    assert!(matches!(b.verify(&TrustedKeys::default()), Err(BundleError::UntrustedKey { .. })));
}

#[test]
fn tampered_manifest_fails_the_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    let signer = key(7);
    rebundle(&dir, Some(&signer), |_| {}).unwrap();
    // Lower every threshold: still a valid manifest, but not the one that was signed.
    let text = std::fs::read_to_string(manifest_path(&dir)).unwrap();
    std::fs::write(manifest_path(&dir), text.replace("0.25", "0.01")).unwrap();
    let b = Bundle::open(&dir).expect("still a well-formed bundle");
    let err = b.verify(&TrustedKeys::new([signer.verifying_key()])).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature(_)), "{err}");
}

#[test]
fn tampered_onnx_fails_the_hash_check() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    rebundle(&dir, Some(&key(7)), |_| {}).unwrap();
    let onnx = dir.join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&onnx, bytes).unwrap();
    let err = Bundle::open(&dir).unwrap_err();
    assert!(matches!(&err, BundleError::HashMismatch { file, .. } if file == "model.onnx"), "{err}");
}

#[test]
fn unsigned_bundle_is_reported_as_unsigned() {
    let tmp = tempfile::tempdir().unwrap();
    let b = rebundle(&tmp.path().join("b"), None, |_| {}).unwrap();
    assert!(matches!(b.verify(&TrustedKeys::new([key(1).verifying_key()])), Err(BundleError::Unsigned)));
}

#[test]
fn manifest_errors_are_specific() {
    let tmp = tempfile::tempdir().unwrap();
    let src = imagenet_bundle();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("unknown key", Box::new(|m| m["colour"] = "red".into()), "unknown field"),
        ("schema v2", Box::new(|m| m["schema_version"] = 2.into()), "schema version 2"),
        ("bad name", Box::new(|m| m["name"] = "Has Spaces".into()), "name"),
        ("bad version", Box::new(|m| m["version"] = "one".into()), "version"),
        (
            "threshold count",
            Box::new(|m| {
                m["heads"][0]["thresholds"].as_array_mut().unwrap().pop();
            }),
            "999 thresholds for 1000 classes",
        ),
        ("temperature", Box::new(|m| m["heads"][0]["temperature"] = 0.into()), "temperature"),
        ("onnx escapes", Box::new(|m| m["onnx"]["file"] = "../model.onnx".into()), "plain file name"),
        ("no heads", Box::new(|m| m["heads"] = serde_json::json!([])), "heads is empty"),
        ("input size", Box::new(|m| m["input"]["width"] = 0.into()), "input"),
        (
            "applies_to unknown",
            Box::new(|m| m["heads"][0]["applies_to"] = serde_json::json!({"attribute": "nope", "values": ["x"]})),
            "unknown head",
        ),
    ];
    for (i, (what, edit, expect)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        copy_dir(&src, &dir);
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest_path(&dir)).unwrap()).unwrap();
        edit(&mut m);
        std::fs::write(manifest_path(&dir), serde_json::to_vec(&m).unwrap()).unwrap();
        let err = Bundle::open(&dir).expect_err(what);
        let msg = format!("{err}");
        assert!(msg.contains(expect), "{what}: error {msg:?} does not mention {expect:?}");
    }
    let err = Bundle::open(tmp.path()).unwrap_err();
    assert!(matches!(err, BundleError::NotABundle { .. }), "{err}");
}

#[test]
fn tar_round_trip_and_hostile_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let signer = key(3);
    let b = rebundle(&tmp.path().join("src"), Some(&signer), |_| {}).unwrap();
    let tar_path = tmp.path().join("b.tar");
    bundle::pack_tar(&b, &tar_path).unwrap();
    let models = tmp.path().join("models");
    // A bundle the check refuses (here: signed by nobody trusted) is never seen under its final name, and no
    // staging directory is left.
    let untrusted = TrustedKeys::new([key(4).verifying_key()]);
    let refused = bundle::unpack_tar_checked(std::fs::File::open(&tar_path).unwrap(), &models, |b| {
        b.verify(&untrusted).map(drop)
    })
    .unwrap_err();
    assert!(matches!(refused, bundle::BundleError::UntrustedKey { .. }), "{refused:?}");
    assert_eq!(std::fs::read_dir(&models).unwrap().count(), 0);
    let unpacked = bundle::unpack_tar(std::fs::File::open(&tar_path).unwrap(), &models).unwrap();
    assert_eq!(unpacked.manifest(), b.manifest());
    assert_eq!(unpacked.dir(), models.join("imagenet-lite0-1.0.0"));
    unpacked.verify(&TrustedKeys::new([signer.verifying_key()])).unwrap();
    // Same version again: refused, the installed one untouched.
    let again = bundle::unpack_tar(std::fs::File::open(&tar_path).unwrap(), &models).unwrap_err();
    assert!(again.to_string().contains("already installed"), "{again}");
    // Packing is deterministic.
    let tar2 = tmp.path().join("b2.tar");
    bundle::pack_tar(&unpacked, &tar2).unwrap();
    assert_eq!(std::fs::read(&tar_path).unwrap(), std::fs::read(&tar2).unwrap());

    let hostile = |name: &str, build: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut t = tar::Builder::new(Vec::new());
        build(&mut t);
        let bytes = t.into_inner().unwrap();
        let dest = tmp.path().join(format!("hostile-{name}"));
        let err = bundle::unpack_tar(bytes.as_slice(), &dest).expect_err(name);
        // Nothing but the (empty) destination is left behind.
        let left: Vec<_> = std::fs::read_dir(&dest).unwrap().collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
        err
    };
    let file = |t: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses "..", so write the raw name like a hostile tool would.
        let name = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        t.append(&h, data).unwrap();
    };
    let err = hostile("dotdot", &|t| file(t, "../evil.json", b"{}"));
    assert!(err.to_string().contains("escapes"), "{err}");
    let err = hostile("absolute", &|t| file(t, "/etc/evil.json", b"{}"));
    assert!(err.to_string().contains("escapes"), "{err}");
    let err = hostile("symlink", &|t| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        t.append_link(&mut h, "manifest.json", "/etc/passwd").unwrap();
    });
    assert!(err.to_string().contains("not allowed"), "{err}");
    let err = hostile("no manifest", &|t| file(t, "model.onnx", b"x"));
    assert!(err.to_string().contains("manifest.json"), "{err}");
    let err = hostile("garbage", &|_| {});
    assert!(matches!(err, BundleError::Archive(_)), "{err}");
}

#[test]
fn keys_round_trip_through_pem_files() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key(9);
    let (private, public) = bundle::write_keypair(&k, &tmp.path().join("demo")).unwrap();
    assert_eq!(bundle::read_signing_key(&private).unwrap().to_bytes(), k.to_bytes());
    assert_eq!(bundle::read_public_key(&public).unwrap(), k.verifying_key());
    // Never overwrite a private key.
    assert!(bundle::write_keypair(&key(10), &tmp.path().join("demo")).is_err());
    std::fs::write(tmp.path().join("junk.pub"), "not a key").unwrap();
    let err = bundle::read_public_key(&tmp.path().join("junk.pub")).unwrap_err();
    assert!(err.to_string().contains("not an ed25519 public key"), "{err}");
}
