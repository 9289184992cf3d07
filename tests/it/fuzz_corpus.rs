//! The fuzz corpora (`fuzz/corpus/<target>/`, grown by `scripts/fuzz`) replayed through the same target bodies
//! libFuzzer runs (`attrd::fuzzing`): every input that once exercised a new path still fails cleanly, without a
//! panic. This is the brief fuzzing run of every test suite; the long coverage-guided runs are `scripts/fuzz`.

use crate::common::repo;

#[test]
fn every_fuzz_corpus_replays_without_a_panic() {
    for (name, body) in attrd::fuzzing::TARGETS {
        let dir = repo().join("fuzz/corpus").join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (the corpora are kept in git)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(inputs.len() >= 5, "{name}: only {} corpus inputs in {}", inputs.len(), dir.display());
        for path in &inputs {
            // A fuzzer running meanwhile replaces inputs by smaller ones; a vanished file is not a finding.
            let Ok(data) = std::fs::read(path) else { continue };
            if let Err(panic) = std::panic::catch_unwind(|| body(&data)) {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("fuzz target {name} panics on {}: {msg}", path.display());
            }
        }
    }
}

/// The bundle_tar corpus keeps the hostile archives (path traversal, absolute paths, writes through a symlink) as
/// seeds, and the unpacker refuses each of them.
#[test]
fn the_bundle_tar_corpus_holds_hostile_archives_that_are_refused() {
    let dir = repo().join("fuzz/corpus/bundle_tar");
    for seed in ["seed-traversal.tar", "seed-absolute.tar", "seed-symlink.tar"] {
        let data = std::fs::read(dir.join(seed)).unwrap();
        let models = tempfile::tempdir().unwrap();
        let err = attrd::bundle::unpack_tar(&data[..], models.path()).unwrap_err().to_string();
        assert!(err.contains("escapes") || err.contains("not allowed"), "{seed}: {err}");
    }
}
