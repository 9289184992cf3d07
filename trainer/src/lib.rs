//! The trainer library: everything `trainer` does, importable by its tests.

pub mod effnet;
pub mod weights;
