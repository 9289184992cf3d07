//! The bodies of the fuzz targets (`fuzz/fuzz_targets/`), here so that the regular test suite replays the kept
//! corpora (`fuzz/corpus/<target>/`) through exactly the code libFuzzer explores (`tests/it/fuzz_corpus.rs`).
//! Each takes arbitrary bytes; an `Err` from the code under test is the expected outcome for most inputs, a panic
//! (including the invariant checks here) is a finding.

use std::path::Path;
use std::sync::OnceLock;

use crate::mqtt::topics::Topics;
use crate::preprocess::{InputSpec, Limits, Preprocessor};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [(&str, Target); 5] = [
    ("preprocess", preprocess),
    ("one_eighth", one_eighth),
    ("manifest", manifest),
    ("bundle_tar", bundle_tar),
    ("mqtt_message", mqtt_message),
];

/// Decode + resize + normalise. The limits are small so the fuzzer explores headers rather than legal huge images.
pub fn preprocess(data: &[u8]) {
    static PRE: OnceLock<Preprocessor> = OnceLock::new();
    let pre = PRE.get_or_init(|| {
        Preprocessor::new(InputSpec::imagenet(64, 64), Limits { max_file_bytes: 1 << 20, max_pixels: 4_000_000 })
            .unwrap_or_else(|e| panic!("the fuzz spec is valid: {e}"))
    });
    if let Ok(t) = pre.prepare(data) {
        assert_eq!(t.len(), pre.spec().tensor_len(), "tensor length");
        assert!(t.iter().all(|v| v.is_finite()), "non-finite tensor value");
    }
}

/// Differential: attrd's 1/8-scale JPEG decoder against libjpeg-turbo's. Whatever it accepts, libjpeg-turbo must
/// decode without a warning, to the same pixels. (The `preprocess` target reaches it too, but only for headers
/// of about 600 px and more, where its 64×64 spec picks 1/8, and without comparing pixels.) Without the `turbojpeg` feature neither exists.
pub fn one_eighth(data: &[u8]) {
    #[cfg(feature = "turbojpeg")]
    if let Ok(ours) = crate::preprocess::decode_one_eighth(data, 4_000_000) {
        match crate::preprocess::libjpeg_turbo_one_eighth(data, 4_000_000) {
            Ok(reference) => assert!(ours == reference, "the 1/8 decoder differs from libjpeg-turbo"),
            Err(e) => panic!("the 1/8 decoder accepted a file libjpeg-turbo refuses: {e}"),
        }
    }
    #[cfg(not(feature = "turbojpeg"))]
    let _ = data;
}

/// Manifest parsing and validation; what is accepted serialises and parses back.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = crate::bundle::parse_manifest_bytes(data) {
        let again = serde_json::to_vec(&m).unwrap_or_else(|e| panic!("an accepted manifest serialises: {e}"));
        if let Err(e) = crate::bundle::parse_manifest_bytes(&again) {
            panic!("an accepted manifest, serialised, is rejected: {e}");
        }
    }
}

/// Bundle archive unpacking into a fresh models directory: nothing may be written outside it, and no staging
/// directory may survive, whatever the outcome.
pub fn bundle_tar(data: &[u8]) {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let models = root.path().join("models");
    let _ = crate::bundle::unpack_tar(data, &models);
    for name in names(root.path()) {
        assert_eq!(name, "models", "unpacking wrote outside the models directory");
    }
    for name in names(&models) {
        assert!(!name.starts_with(".unpack-"), "staging directory {name} left behind");
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// An MQTT message a node receives. The first byte picks the kind, a NUL splits topic from payload: command topics
/// (`attrd/<node>/cmd/<kind>`) with JSON payloads, or model-transfer announcements on `attrd/models/<name>`.
pub fn mqtt_message(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let (topic, payload) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let topic = String::from_utf8_lossy(topic);
    static TOPICS: OnceLock<Topics> = OnceLock::new();
    let topics = TOPICS.get_or_init(|| Topics::new("attrd", "fuzz-node").unwrap_or_else(|e| panic!("topics: {e}")));
    if kind % 2 == 0 {
        if let Ok(crate::mqtt::topics::CommandTopic::Command(k)) = topics.parse_command(&topic) {
            // A command kind that parsed is usable as a topic segment again.
            let _ = topics.cmd_response(&k);
        }
        let _ = serde_json::from_slice::<serde_json::Value>(payload);
    } else {
        let _ = topics.parse_model(&topic);
        let _ = crate::mqtt::transfer::Announcement::parse(payload, "fuzz-model", 1 << 30);
    }
}
