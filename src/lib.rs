//! attrd library: the parts shared by the daemon and the trainer.

pub mod bundle;
pub mod engine;
pub mod preprocess;
