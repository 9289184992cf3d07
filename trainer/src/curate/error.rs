//! Errors of curation. Problems with single records or images are not errors: they are removals with a reason
//! (see [`Reason`](super::Reason)). These are the problems that stop a run or a load.

use std::path::PathBuf;

/// Why curation, or loading a curated dataset, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CurateError {
    /// The schema file could not be read.
    #[error("reading schema {}", .path.display())]
    ReadSchema {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The schema file is not valid TOML for a [`Schema`](super::Schema) (the message shows the offending key).
    #[error("parsing schema {}", .path.display())]
    ParseSchema {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The schema parsed but is inconsistent.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The labels file (or image folder) could not be read.
    #[error("reading {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A CSV labels file is malformed.
    #[error("reading CSV {}", .path.display())]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    /// A JSONL line is not a JSON object of scalars and lists of scalars.
    #[error("{}:{line}: {reason}", .path.display())]
    Jsonl {
        path: PathBuf,
        line: usize,
        reason: String,
        #[source]
        source: Option<serde_json::Error>,
    },
    /// The schema names a column the labels do not have.
    #[error("{what} names column {column:?}, which {} does not have (columns: {available})", .path.display())]
    MissingColumn { what: String, column: String, path: PathBuf, available: String },
    /// Nothing survived curation.
    #[error("no items left after curation ({removed} removed); see removed.csv")]
    NothingLeft { removed: usize },
    /// Writing an output file failed.
    #[error("writing {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a CSV report file failed.
    #[error("writing {}", .path.display())]
    WriteCsv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    /// Drawing a report plot failed.
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    /// A dataset manifest could not be read or parsed.
    #[error("reading dataset manifest {}", .path.display())]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A dataset manifest parsed but is inconsistent (wrong version, fingerprint mismatch, bad label).
    #[error("dataset manifest {}: {reason}", .path.display())]
    InvalidManifest { path: PathBuf, reason: String },
}

/// An inconsistent schema. The message names the attribute (when there is one) and the offending key and value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A key has a value that is out of range or contradicts another key.
    #[error("{context}: {message}")]
    Invalid { context: String, message: String },
    /// A text rule's regular expression does not compile.
    #[error("attribute {attribute:?}: derive.rules[{index}].pattern {pattern:?} is not a valid regex")]
    Regex {
        attribute: String,
        index: usize,
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
}

impl SchemaError {
    pub(crate) fn attr(attribute: &str, key: &str, message: impl Into<String>) -> Self {
        SchemaError::Invalid { context: format!("attribute {attribute:?}: {key}"), message: message.into() }
    }

    pub(crate) fn key(key: &str, message: impl Into<String>) -> Self {
        SchemaError::Invalid { context: key.to_string(), message: message.into() }
    }
}
