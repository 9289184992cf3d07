//! The attrd crate's single integration-test binary; each module covers one area.
mod alarm;
mod bundle;
mod cli;
mod common;
mod daemon;
mod engine;
mod fuzz_corpus;
mod http;
mod models;
mod mqtt;
mod outbox;
mod pipeline;
mod preprocess;
mod soak;
mod sources;
mod systemd;
