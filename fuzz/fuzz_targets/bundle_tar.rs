//! Bundle archives (`attrd model install x.tar`, MQTT transfers): nothing written outside the models directory. The body is `attrd::fuzzing::bundle_tar`, which the test suite also replays over `fuzz/corpus/bundle_tar/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| attrd::fuzzing::bundle_tar(data));
