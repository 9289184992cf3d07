//! attrd library: the parts shared by the daemon and the trainer.

pub mod bundle;
pub mod config;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod models;
pub mod mqtt;
pub mod outbox;
pub mod payload;
pub mod pipeline;
pub mod preprocess;
pub mod sources;
pub mod systemd;
pub mod util;
