//! Shared image preprocessing.
