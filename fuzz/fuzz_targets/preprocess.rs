//! Any bytes through image decoding + resize + normalise. The body is `attrd::fuzzing::preprocess`, which the test suite also replays over `fuzz/corpus/preprocess/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| attrd::fuzzing::preprocess(data));
