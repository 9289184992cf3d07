//! attrd's 1/8-scale JPEG decoder, differentially against libjpeg-turbo. The body is `attrd::fuzzing::one_eighth`, which the test suite also replays over `fuzz/corpus/one_eighth/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| attrd::fuzzing::one_eighth(data));
