//! The attrd crate's single integration-test binary; each module covers one area.
mod bundle;
mod cli;
mod common;
mod engine;
mod preprocess;
