//! Bundle manifests: parse + validate, and accepted ones round-trip. The body is `attrd::fuzzing::manifest`, which the test suite also replays over `fuzz/corpus/manifest/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| attrd::fuzzing::manifest(data));
