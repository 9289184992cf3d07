//! Reading catalogs into one table shape: CSV with a header row, JSONL (one object per line) and ImageFolder trees
//! (`root/<class>/<image>`).

use super::CurateError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// How the labels are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A CSV file with a header row.
    Csv,
    /// One JSON object per line; values are strings, numbers, booleans, null (missing) or lists (multi-label).
    Jsonl,
    /// No labels file: `root/<class>/<image>`; each record has the columns `id` and `image` (the path below the
    /// root) and `class` (the folder name).
    Imagefolder,
}

impl Format {
    /// The format a labels file's extension implies (`.csv`, `.jsonl`/`.ndjson`), or ImageFolder without a file.
    pub fn detect(labels: Option<&Path>) -> Option<Format> {
        let Some(labels) = labels else { return Some(Format::Imagefolder) };
        match labels.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

/// One cell: text, or a list of values from JSONL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    Text(String),
    List(Vec<String>),
}

impl Field {
    /// The cell as one string (lists joined by spaces, as text rules want them).
    pub(crate) fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Field::Text(s) => s.as_str().into(),
            Field::List(v) => v.join(" ").into(),
        }
    }
}

/// One imported record: its cells in [`Table::columns`] order (`None` = absent or null).
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// 1-based line (CSV, JSONL) or position (ImageFolder) in the source, for messages.
    pub line: usize,
    pub fields: Vec<Option<Field>>,
}

/// Imported records, all with the same columns.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    /// Where the records came from, for messages.
    pub path: PathBuf,
    pub columns: Vec<String>,
    pub index: HashMap<String, usize>,
    pub records: Vec<Record>,
}

impl Table {
    fn new(path: &Path, columns: Vec<String>) -> Self {
        let index = columns.iter().enumerate().map(|(i, c)| (c.clone(), i)).collect();
        Table { path: path.to_path_buf(), columns, index, records: Vec::new() }
    }

    /// The index of `column`, or an error saying who needs it.
    pub fn column(&self, column: &str, what: impl FnOnce() -> String) -> Result<usize, CurateError> {
        self.index.get(column).copied().ok_or_else(|| CurateError::MissingColumn {
            what: what(),
            column: column.to_string(),
            path: self.path.clone(),
            available: self.columns.join(", "),
        })
    }
}

/// Reads `labels` (CSV or JSONL) or walks `images` (ImageFolder).
pub(crate) fn read(format: Format, labels: Option<&Path>, images: &Path) -> Result<Table, CurateError> {
    let need_labels = || CurateError::Read {
        path: images.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{format:?} input needs a labels file")),
    };
    let table = match format {
        Format::Csv => read_csv(labels.ok_or_else(need_labels)?)?,
        Format::Jsonl => read_jsonl(labels.ok_or_else(need_labels)?)?,
        Format::Imagefolder => read_imagefolder(images)?,
    };
    tracing::info!(path = %table.path.display(), ?format, records = table.records.len(), columns = table.columns.len(), "imported labels");
    Ok(table)
}

pub(crate) fn read_csv(path: &Path) -> Result<Table, CurateError> {
    let csv_err = |source| CurateError::Csv { path: path.to_path_buf(), source };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_path(path).map_err(csv_err)?;
    let columns: Vec<String> = reader.headers().map_err(csv_err)?.iter().map(|h| h.trim().to_string()).collect();
    let mut table = Table::new(path, columns);
    for row in reader.records() {
        let row = row.map_err(csv_err)?;
        // Invariant: csv rejects rows whose length differs from the header's (flexible is off).
        let line = row.position().map_or(0, |p| p.line() as usize);
        let fields = row.iter().map(|v| Some(Field::Text(v.to_string()))).collect();
        table.records.push(Record { line, fields });
    }
    Ok(table)
}

pub(crate) fn read_jsonl(path: &Path) -> Result<Table, CurateError> {
    let file = std::fs::File::open(path).map_err(|source| CurateError::Read { path: path.to_path_buf(), source })?;
    let mut columns: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut rows: Vec<(usize, Vec<(usize, Field)>)> = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|source| CurateError::Read { path: path.to_path_buf(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String, source| CurateError::Jsonl { path: path.to_path_buf(), line: n, reason, source };
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad("not valid JSON".into(), Some(e)))?;
        let serde_json::Value::Object(obj) = value else {
            return Err(bad("expected a JSON object".into(), None));
        };
        let mut row = Vec::with_capacity(obj.len());
        for (key, v) in obj {
            let field = match json_field(&v) {
                Ok(f) => f,
                Err(what) => {
                    return Err(bad(format!("field {key:?} is {what}; expected a scalar or a list of scalars"), None));
                }
            };
            let col = *index.entry(key.clone()).or_insert_with(|| {
                columns.push(key);
                columns.len() - 1
            });
            if let Some(f) = field {
                row.push((col, f));
            }
        }
        rows.push((n, row));
    }
    let mut table = Table::new(path, columns);
    let width = table.columns.len();
    for (line, row) in rows {
        let mut fields = vec![None; width];
        for (col, f) in row {
            fields[col] = Some(f);
        }
        table.records.push(Record { line, fields });
    }
    Ok(table)
}

/// A JSON value as a cell: `Ok(None)` for null, `Err(kind)` for nested objects.
fn json_field(v: &serde_json::Value) -> Result<Option<Field>, &'static str> {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        Value::Null => Ok(None),
        Value::Array(_) => Err("a nested list"),
        Value::Object(_) => Err("an object"),
    };
    match v {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Some(s) = scalar(item)? {
                    out.push(s);
                }
            }
            Ok(Some(Field::List(out)))
        }
        other => Ok(scalar(other)?.map(Field::Text)),
    }
}

/// Column names of ImageFolder records.
pub const IMAGEFOLDER_COLUMNS: [&str; 3] = ["id", "image", "class"];

pub(crate) fn read_imagefolder(root: &Path) -> Result<Table, CurateError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CurateError::Read { path, source }
    };
    let mut table = Table::new(root, IMAGEFOLDER_COLUMNS.iter().map(|c| c.to_string()).collect());
    let mut classes: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(root).map_err(read_err(root))? {
        let entry = entry.map_err(read_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type().map_err(read_err(&entry.path()))?.is_dir() {
            classes.push((name, entry.path()));
        }
    }
    // Directory order is arbitrary; sorted input keeps record order (and so "first copy" choices) reproducible.
    classes.sort();
    for (class, dir) in classes {
        let mut files: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(read_err(&dir))? {
            let entry = entry.map_err(read_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Hidden files (.DS_Store, editor droppings) are not images; anything else is scanned, so that a stray
            // non-image shows up in removed.csv instead of vanishing.
            if !name.starts_with('.') && entry.file_type().map_err(read_err(&entry.path()))?.is_file() {
                files.push(name);
            }
        }
        files.sort();
        for file in files {
            let rel = format!("{class}/{file}");
            let line = table.records.len() + 1;
            let fields = vec![Some(Field::Text(rel.clone())), Some(Field::Text(rel)), Some(Field::Text(class.clone()))];
            table.records.push(Record { line, fields });
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_jsonl_and_imagefolder_import() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("l.csv");
        std::fs::write(&csv, "id,file,colour\n1,a.jpg,Red\n2,b.jpg,\"Navy, Blue\"\n").unwrap();
        let t = read_csv(&csv).unwrap();
        assert_eq!(t.columns, ["id", "file", "colour"]);
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.records[1].fields[2], Some(Field::Text("Navy, Blue".into())));
        assert_eq!(t.records[1].line, 3);

        let jsonl = dir.path().join("l.jsonl");
        std::fs::write(
            &jsonl,
            "{\"id\": 7, \"file\": \"a.jpg\", \"tags\": [\"x\", \"y\"]}\n\n{\"id\": \"8\", \"tags\": null}\n",
        )
        .unwrap();
        let t = read_jsonl(&jsonl).unwrap();
        assert_eq!(t.columns, ["file", "id", "tags"]);
        let id = t.index["id"];
        assert_eq!(t.records[0].fields[id], Some(Field::Text("7".into())));
        assert_eq!(t.records[0].fields[t.index["tags"]], Some(Field::List(vec!["x".into(), "y".into()])));
        assert_eq!(t.records[1].fields[t.index["file"]], None);
        assert_eq!(t.records[1].line, 3);
        std::fs::write(&jsonl, "{\"id\": 1}\n{\"id\": {\"a\": 1}}\n").unwrap();
        let err = read_jsonl(&jsonl).unwrap_err().to_string();
        assert!(err.ends_with("l.jsonl:2: field \"id\" is an object; expected a scalar or a list of scalars"), "{err}");

        let root = dir.path().join("tree");
        for (class, file) in [("shirt", "b.jpg"), ("shirt", "a.jpg"), ("shoe", "c.png"), ("shoe", ".DS_Store")] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            std::fs::write(root.join(class).join(file), b"x").unwrap();
        }
        let t = read_imagefolder(&root).unwrap();
        let rows: Vec<Vec<String>> = t
            .records
            .iter()
            .map(|r| r.fields.iter().map(|f| f.as_ref().unwrap().text().into_owned()).collect())
            .collect();
        assert_eq!(
            rows,
            [
                ["shirt/a.jpg", "shirt/a.jpg", "shirt"],
                ["shirt/b.jpg", "shirt/b.jpg", "shirt"],
                ["shoe/c.png", "shoe/c.png", "shoe"]
            ]
        );
    }

    #[test]
    fn format_detection() {
        assert_eq!(Format::detect(Some(Path::new("x/labels.CSV"))), Some(Format::Csv));
        assert_eq!(Format::detect(Some(Path::new("l.ndjson"))), Some(Format::Jsonl));
        assert_eq!(Format::detect(None), Some(Format::Imagefolder));
        assert_eq!(Format::detect(Some(Path::new("l.txt"))), None);
    }
}
