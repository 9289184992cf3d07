//! Model bundle v1.
