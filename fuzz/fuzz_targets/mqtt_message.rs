//! MQTT messages a node receives: command topics + JSON payloads, model-transfer announcements. The body is `attrd::fuzzing::mqtt_message`, which the test suite also replays over `fuzz/corpus/mqtt_message/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| attrd::fuzzing::mqtt_message(data));
