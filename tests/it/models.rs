//! The model store: install, verify, self-test on the target provider, activate, roll back.

use crate::common::{imagenet_bundle, repo};
use attrd::bundle::{self, Bundle, NewBundle, TrustedKeys};
use attrd::engine::EngineConfig;
use attrd::models::{ModelError, ModelStore};
use ed25519_dalek::SigningKey;
use std::path::{Path, PathBuf};

fn demo_keys() -> TrustedKeys {
    TrustedKeys::from_files([repo().join("config/keys/attrd-demo.pub")]).unwrap()
}

pub(crate) fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// A copy of the bundle at `src` as `version` in `out`, its golden set changed by `edit`.
fn rebundle(
    src: &Path,
    out: &Path,
    version: &str,
    signer: Option<&SigningKey>,
    edit: impl FnOnce(&mut bundle::GoldenSet),
) -> Result<PathBuf, bundle::BundleError> {
    rebundle_as(src, out, None, version, signer, edit)
}

/// [`rebundle`], under another name too when `name` is given.
fn rebundle_as(
    src: &Path,
    out: &Path,
    name: Option<&str>,
    version: &str,
    signer: Option<&SigningKey>,
    edit: impl FnOnce(&mut bundle::GoldenSet),
) -> Result<PathBuf, bundle::BundleError> {
    let src = Bundle::open(src).unwrap();
    let mut m = src.manifest().clone();
    if let Some(name) = name {
        m.name = name.to_string();
    }
    m.version = version.parse().unwrap();
    let mut set = src.golden().unwrap().expect("the source bundle ships a golden set");
    let images: Vec<(PathBuf, String)> = set
        .items
        .iter()
        .map(|i| (src.golden_image_path(i), i.file.trim_start_matches("golden/").to_string()))
        .collect();
    edit(&mut set);
    bundle::write(
        out,
        NewBundle { manifest: m, onnx: &src.onnx_path(), golden: Some((images, set)), signing_key: signer },
    )?;
    Ok(out.to_path_buf())
}

/// A copy of the ImageNet bundle under another version, optionally with its golden references altered.
pub(crate) fn variant(dir: &Path, version: &str, signer: Option<&SigningKey>, skew_golden: f32) -> PathBuf {
    let skew = |set: &mut bundle::GoldenSet| {
        for item in &mut set.items {
            for p in item.probabilities.values_mut() {
                p[0] += skew_golden;
            }
        }
    };
    rebundle(&imagenet_bundle(), &dir.join(format!("src-{version}")), version, signer, skew).unwrap()
}

/// A copy of the ImageNet bundle under another name and version.
pub(crate) fn renamed(dir: &Path, name: &str, version: &str, signer: &SigningKey) -> PathBuf {
    rebundle_as(&imagenet_bundle(), &dir.join(format!("{name}-{version}")), Some(name), version, Some(signer), |_| {})
        .unwrap()
}

#[test]
fn install_activate_self_test_and_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = TrustedKeys::new([demo_keys_key(), test_key().verifying_key()]);
    let store = ModelStore::open(tmp.path().join("models"), keys, false).unwrap();
    let cfg = EngineConfig::cpu();

    let v1 = store.install(&imagenet_bundle()).unwrap();
    assert_eq!(v1.label(), "imagenet-lite0@1.0.0");
    assert!(matches!(store.active(), Err(ModelError::NoneActive)));
    let (_, report) = store.activate("imagenet-lite0-1.0.0", &cfg).unwrap();
    assert_eq!(report.golden_items, 4);
    assert!(report.max_abs_diff <= 1e-5, "CPU reproduces its own references: {}", report.max_abs_diff);
    assert_eq!(report.provider, "cpu");

    // v2 arrives as a tar (how bundles are shipped) and is activated; v1 becomes the rollback target.
    let v2_dir = variant(tmp.path(), "1.1.0", Some(&test_key()), 0.0);
    let tar = tmp.path().join("v2.tar");
    bundle::pack_tar(&Bundle::open(&v2_dir).unwrap(), &tar).unwrap();
    store.install(&tar).unwrap();
    store.activate("imagenet-lite0-1.1.0", &cfg).unwrap();
    assert_eq!(store.state().unwrap().active.as_deref(), Some("imagenet-lite0-1.1.0"));
    assert_eq!(store.state().unwrap().previous, vec!["imagenet-lite0-1.0.0".to_string()]);
    let list = store.list().unwrap();
    assert_eq!(list.iter().filter(|i| i.active).map(|i| i.id.as_str()).collect::<Vec<_>>(), ["imagenet-lite0-1.1.0"]);

    let (back, _, _) = store.rollback(&cfg).unwrap();
    assert_eq!(back, "imagenet-lite0-1.0.0");
    assert_eq!(store.active().unwrap().label(), "imagenet-lite0@1.0.0");
    assert!(matches!(store.install(&imagenet_bundle()), Err(ModelError::AlreadyInstalled { .. })));
}

fn demo_keys_key() -> ed25519_dalek::VerifyingKey {
    bundle::read_public_key(&repo().join("config/keys/attrd-demo.pub")).unwrap()
}

#[test]
fn a_bundle_that_fails_its_golden_set_is_refused_and_the_old_one_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(
        tmp.path().join("models"),
        TrustedKeys::new([demo_keys_key(), test_key().verifying_key()]),
        false,
    )
    .unwrap();
    let cfg = EngineConfig::cpu();
    store.install(&imagenet_bundle()).unwrap();
    store.activate("imagenet-lite0-1.0.0", &cfg).unwrap();
    // References off by 0.05: as if the model had been quantized badly or the provider computed something else.
    store.install(&variant(tmp.path(), "2.0.0", Some(&test_key()), 0.05)).unwrap();
    let err = store.activate("imagenet-lite0-2.0.0", &cfg).unwrap_err();
    assert!(matches!(err, ModelError::SelfTest { .. }), "{err}");
    assert!(err.to_string().contains("tolerance"), "{err}");
    assert_eq!(store.active().unwrap().label(), "imagenet-lite0@1.0.0");
}

#[test]
fn unsigned_and_untrusted_bundles_are_not_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path().join("models"), demo_keys(), false).unwrap();
    let unsigned = variant(tmp.path(), "3.0.0", None, 0.0);
    assert!(matches!(store.install(&unsigned), Err(ModelError::Bundle(attrd::bundle::BundleError::Unsigned))));
    let foreign = variant(tmp.path(), "3.0.1", Some(&test_key()), 0.0);
    let err = store.install(&foreign).unwrap_err();
    assert!(err.to_string().contains("not trusted"), "{err}");
    // Through the archive path too, and nothing is left behind.
    let tar = tmp.path().join("foreign.tar");
    bundle::pack_tar(&Bundle::open(&foreign).unwrap(), &tar).unwrap();
    assert!(store.install(&tar).is_err());
    assert!(store.list().unwrap().is_empty());
}

/// An untrusted archive is refused on its signature before any of its files is hashed: its model file here does not
/// match the manifest, and the refusal names the key, not the hash. (Hashing first let an unsigned archive whose
/// golden items all name one large file keep a core busy for hours.)
#[test]
fn an_untrusted_archive_is_refused_before_its_files_are_hashed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path().join("models"), demo_keys(), false).unwrap();
    let foreign = variant(tmp.path(), "3.0.2", Some(&test_key()), 0.0);
    let tar = tmp.path().join("foreign.tar");
    bundle::pack_tar(&Bundle::open(&foreign).unwrap(), &tar).unwrap();
    // The same archive with its model file's bytes changed (same length): a hash check would fail on it.
    let mut bytes = std::fs::read(&tar).unwrap();
    let onnx = std::fs::read(foreign.join("model.onnx")).unwrap();
    let at = bytes.windows(64).position(|w| w == &onnx[onnx.len() / 2..onnx.len() / 2 + 64]).unwrap();
    bytes[at] ^= 0xff;
    let err = store.install_tar(&bytes[..]).unwrap_err();
    assert!(err.to_string().contains("not trusted"), "{err}");
    // With the key trusted, the same archive fails on the hash: the check above came first.
    let trusting =
        ModelStore::open(tmp.path().join("models2"), TrustedKeys::new([test_key().verifying_key()]), false).unwrap();
    let err = trusting.install_tar(&bytes[..]).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
    assert!(store.list().unwrap().is_empty() && trusting.list().unwrap().is_empty());
}

/// Shipped over MQTT, an archive must hold the bundle its announcement names: a well-signed bundle of another name
/// or version (another product line, an old version replayed) is refused and not installed.
#[test]
fn an_archive_that_holds_another_bundle_than_announced_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store =
        ModelStore::open(tmp.path().join("models"), TrustedKeys::new([test_key().verifying_key()]), false).unwrap();
    let b = Bundle::open(variant(tmp.path(), "3.1.0", Some(&test_key()), 0.0)).unwrap();
    let tar = tmp.path().join("b.tar");
    bundle::pack_tar(&b, &tar).unwrap();
    let bytes = std::fs::read(&tar).unwrap();
    let name = b.manifest().name.clone();
    for (n, v) in [(name.as_str(), "3.2.0"), ("other-line", "3.1.0")] {
        let err = store.install_tar_as(&bytes[..], Some((n, v))).unwrap_err();
        assert!(
            matches!(&err, ModelError::Bundle(bundle::BundleError::NotAsAnnounced { expected, .. }) if *expected == format!("{n} {v}")),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("{name} 3.1.0")), "names what the archive holds: {err}");
    }
    assert!(store.list().unwrap().is_empty(), "nothing installed");
    let installed = store.install_tar_as(&bytes[..], Some((&name, "3.1.0"))).unwrap();
    assert_eq!(installed.manifest().version.to_string(), "3.1.0");
}

/// The default (INT8) bundle re-signed with the test key as `version`, its golden set changed by `edit`.
fn int8_variant(
    dir: &Path,
    version: &str,
    edit: impl FnOnce(&mut bundle::GoldenSet),
) -> Result<PathBuf, bundle::BundleError> {
    let src = repo().join("models/fashion-lite0-int8");
    rebundle(&src, &dir.join(format!("int8-{version}")), version, Some(&test_key()), edit)
}

/// An INT8 bundle carries what its graph computed on the packaging machine's CPU, and the CPU provider here must
/// reproduce that closely (integer kernels are exact), much closer than the fp32 references' tolerance, which has to
/// allow for quantization itself. References moved by less than that fp32 tolerance but more than the CPU one are
/// refused, naming the CPU check; so is a golden file whose CPU references and tolerance do not go together.
#[test]
fn an_int8_bundle_must_reproduce_its_packaged_cpu_outputs_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let store =
        ModelStore::open(tmp.path().join("models"), TrustedKeys::new([test_key().verifying_key()]), false).unwrap();
    let cfg = EngineConfig::cpu();
    let shipped = Bundle::open(repo().join("models/fashion-lite0-int8")).unwrap().golden().unwrap().unwrap();
    let cpu_tolerance = shipped.cpu_tolerance.expect("the default INT8 bundle ships packaged CPU outputs");
    assert!(cpu_tolerance < shipped.tolerance / 10.0, "{cpu_tolerance} vs {}", shipped.tolerance);

    // As packaged (on another machine, possibly another CPU): reproduced to within float rounding.
    store.install(&int8_variant(tmp.path(), "1.0.1", |_| {}).unwrap()).unwrap();
    let (_, report) = store.activate("fashion-attributes-1.0.1", &cfg).unwrap();
    assert_eq!(report.golden_items, shipped.items.len());
    assert_eq!(report.cpu_tolerance, Some(cpu_tolerance));
    let cpu_diff = report.cpu_max_abs_diff.unwrap();
    assert!(cpu_diff <= 1e-4, "the CPU reproduces the packaged INT8 outputs: {cpu_diff}");
    assert!(report.max_abs_diff > 10.0 * cpu_diff.max(1e-4), "INT8 is further from fp32: {report:?}");

    // Packaged CPU outputs off by 3 × cpu_tolerance: within the fp32 tolerance, so only the CPU check can see it.
    let skew = 3.0 * cpu_tolerance;
    assert!(report.max_abs_diff + skew < shipped.tolerance);
    store
        .install(
            &int8_variant(tmp.path(), "1.0.2", |set| {
                for item in &mut set.items {
                    for p in item.cpu_probabilities.as_mut().unwrap().values_mut() {
                        p[0] += skew;
                    }
                }
            })
            .unwrap(),
        )
        .unwrap();
    let err = store.activate("fashion-attributes-1.0.2", &cfg).unwrap_err();
    assert!(matches!(err, ModelError::SelfTest { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("from the packaged CPU result") && text.contains("cpu_tolerance"), "{text}");
    assert_eq!(store.active().unwrap().label(), "fashion-attributes@1.0.1", "the old model keeps serving");

    // Without the CPU references the bundle is still served, on its fp32 references alone.
    store
        .install(
            &int8_variant(tmp.path(), "1.0.3", |set| {
                set.cpu_tolerance = None;
                set.items.iter_mut().for_each(|item| item.cpu_probabilities = None);
            })
            .unwrap(),
        )
        .unwrap();
    let (_, report) = store.activate("fashion-attributes-1.0.3", &cfg).unwrap();
    assert_eq!((report.cpu_tolerance, report.cpu_max_abs_diff), (None, None));

    // CPU references without their tolerance, or the other way round: the golden file itself is refused, and
    // nothing is left where the bundle would have been.
    let err = int8_variant(tmp.path(), "1.0.4", |set| set.cpu_tolerance = None).unwrap_err();
    assert!(err.to_string().contains("cpu_probabilities without the set's cpu_tolerance"), "{err}");
    assert!(!tmp.path().join("int8-1.0.4").exists());
    let err = int8_variant(tmp.path(), "1.0.5", |set| set.items[1].cpu_probabilities = None).unwrap_err();
    assert!(err.to_string().contains("no cpu_probabilities, but the set has a cpu_tolerance"), "{err}");
    let err = int8_variant(tmp.path(), "1.0.6", |set| set.cpu_tolerance = Some(-0.01)).unwrap_err();
    assert!(err.to_string().contains("cpu_tolerance -0.01 must be a non-negative number"), "{err}");
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".bundle-staging"))
    );
}
