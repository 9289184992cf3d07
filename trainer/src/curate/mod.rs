//! `trainer curate`: turns a labelled catalog into a clean, split, fingerprinted training dataset.
//!
//! Pipeline ([`curate`]):
//! 1. **Import** a CSV, JSONL or ImageFolder catalog ([`Format`]) and label it with a [`Schema`] (merges, renames,
//!    minimum counts, conditional and text-derived attributes; see [`schema`]).
//! 2. **Scan** every image in parallel with the daemon's own decoder (`attrd::preprocess`), so "decodable" means the
//!    same here as in production; remove missing, unreadable, oversized, truncated, undecodable, too small and
//!    blank images ([`Reason`]).
//! 3. **Duplicates**: exact copies (same SHA-256; extra copies dropped by default, conflicting labels made missing
//!    by default) and near duplicates (see [`DuplicateConfig`](schema::DuplicateConfig)); label conflicts inside
//!    groups are reported.
//! 4. **Split** whole groups into train/val/test, stratified and stable (see [`split`]).
//! 5. **Write** `dataset.json` ([`Dataset`]), `report.md`, `removed.csv`, `conflicts.csv` and `plots/*.png`.
//!
//! Training reads the result with [`Dataset::load`].

mod dataset;
mod dedup;
mod error;
mod import;
mod report;
mod scan;
pub mod schema;
pub mod split;

pub use dataset::{Attribute, Dataset, FORMAT_VERSION, Item, Label, LabelCounts, MANIFEST_FILE, Split, SplitInfo};
pub use dedup::Conflict;
pub use error::{CurateError, SchemaError};
pub use import::{Format, IMAGEFOLDER_COLUMNS};
pub use schema::Schema;

use dataset::is_safe_relative;
use scan::Scanned;
use schema::{Canon, ConflictPolicy, GroupBy};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Why an input record is not in the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The id cell is empty.
    MissingId,
    /// An earlier record has the same id.
    DuplicateId,
    /// The image path is empty, absolute or leaves the image root (`..`).
    BadPath,
    /// The image file does not exist.
    MissingFile,
    /// The image file exists but cannot be read.
    Unreadable,
    /// Over the file size or pixel limit.
    TooLarge,
    /// The data ends before the image does.
    Truncated,
    /// Not an image the daemon can decode (unknown format, corrupt data).
    Undecodable,
    /// Narrower or shorter than `images.min_side`.
    TooSmall,
    /// (Nearly) one colour.
    Blank,
    /// A byte-identical copy of an earlier record's image.
    ExactDuplicate,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::MissingId => "missing_id",
            Reason::DuplicateId => "duplicate_id",
            Reason::BadPath => "bad_path",
            Reason::MissingFile => "missing_file",
            Reason::Unreadable => "unreadable",
            Reason::TooLarge => "too_large",
            Reason::Truncated => "truncated",
            Reason::Undecodable => "undecodable",
            Reason::TooSmall => "too_small",
            Reason::Blank => "blank",
            Reason::ExactDuplicate => "exact_duplicate",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A record left out of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The record's id (empty when that was the problem).
    pub id: String,
    /// Line (CSV, JSONL) or position (ImageFolder) of the record in the input.
    pub line: usize,
    /// Image path as given.
    pub image: String,
    pub reason: Reason,
    /// Specifics: the decoder's error, the size, the id of the kept copy, …
    pub detail: String,
}

/// What to curate and where to put it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Labels file (CSV or JSONL); `None` for ImageFolder.
    pub labels: Option<PathBuf>,
    /// Image root: image paths in the labels are relative to it (the tree itself for ImageFolder).
    pub images: PathBuf,
    /// Output directory (created if needed).
    pub out: PathBuf,
    /// Input format; detected from the labels file's extension when `None`.
    pub format: Option<Format>,
    /// Overrides the schema's `split.seed`.
    pub seed: Option<u64>,
    /// A curated dataset whose items keep their splits (see [`split`]).
    pub previous: Option<PathBuf>,
    /// Draw a progress bar on stderr (only shown when stderr is a terminal).
    pub progress: bool,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was written to `dataset.json`.
    pub dataset: Dataset,
    /// Records left out, in input order.
    pub removed: Vec<Removed>,
    /// Label conflicts in duplicate groups, sorted by kind, group and attribute.
    pub conflicts: Vec<Conflict>,
    pub summary: Summary,
}

/// Numbers of a run, as the CLI prints them and the report shows them.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Records read from the input.
    pub records: usize,
    /// Items in the dataset.
    pub kept: usize,
    /// Removed records per reason.
    pub removed: BTreeMap<Reason, usize>,
    /// Items per split (train, val, test).
    pub split_items: [usize; 3],
    /// Split groups (all splits).
    pub groups: usize,
    /// Items in groups of more than one item.
    pub grouped_items: usize,
    /// Conflicts (group × attribute) among exact copies.
    pub exact_conflicts: usize,
    /// Conflicts (group × attribute) in near-duplicate groups.
    pub near_conflicts: usize,
    /// Groups whose items are in more than one split (only when a new item joined items that a previous dataset had
    /// put in different splits).
    pub spanning_groups: usize,
    /// Items whose split came from the previous dataset.
    pub kept_splits: usize,
    /// The dataset's fingerprint.
    pub fingerprint: String,
    /// Output directory.
    pub out: PathBuf,
    /// `report.md` in it.
    pub report: PathBuf,
    /// Wall-clock time of the whole run.
    pub seconds: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let removed: usize = self.removed.values().sum();
        writeln!(f, "kept {} of {} records ({removed} removed) in {:.1} s", self.kept, self.records, self.seconds)?;
        if removed > 0 {
            let parts: Vec<String> = self.removed.iter().map(|(r, n)| format!("{r} {n}")).collect();
            writeln!(f, "removed: {}", parts.join(", "))?;
        }
        let [tr, va, te] = self.split_items;
        writeln!(
            f,
            "splits: train {tr}, val {va}, test {te} ({} groups; {} items share a group with others)",
            self.groups, self.grouped_items
        )?;
        if self.kept_splits > 0 {
            writeln!(f, "kept the previous split of {} items", self.kept_splits)?;
        }
        if self.spanning_groups > 0 {
            writeln!(f, "warning: {} groups span splits (see the report)", self.spanning_groups)?;
        }
        writeln!(
            f,
            "label conflicts: {} among exact copies, {} in near-duplicate groups (conflicts.csv)",
            self.exact_conflicts, self.near_conflicts
        )?;
        writeln!(f, "fingerprint: {}", self.fingerprint)?;
        write!(f, "dataset: {}\nreport: {}", self.out.join(MANIFEST_FILE).display(), self.report.display())
    }
}

/// One record that passed the id and path checks.
struct Candidate {
    record: usize,
    id: String,
    image: String,
}

/// Runs the whole pipeline and writes the output directory.
pub fn curate(schema: &Schema, opts: &Options) -> Result<Outcome, CurateError> {
    let started = std::time::Instant::now();
    let compiled = schema.compile()?;
    let format = match opts.format.or_else(|| Format::detect(opts.labels.as_deref())) {
        Some(f) => f,
        None => {
            let path = opts.labels.clone().unwrap_or_default();
            return Err(CurateError::Read {
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "cannot tell the format from the extension; pass --format csv|jsonl",
                ),
                path,
            });
        }
    };
    let image_root = std::fs::canonicalize(&opts.images)
        .map_err(|source| CurateError::Read { path: opts.images.clone(), source })?;
    let table = import::read(format, opts.labels.as_deref(), &image_root)?;
    let (id_col, image_col) = match format {
        Format::Imagefolder => ("id", "image"),
        _ => (schema.source.id_column.as_str(), schema.source.image_column.as_str()),
    };
    let id_idx = table.column(id_col, || "source.id_column".into())?;
    let image_idx = table.column(image_col, || "source.image_column".into())?;
    let columns = compiled.columns(&table)?;
    let group_cols: Vec<usize> = schema
        .split
        .group_columns
        .iter()
        .map(|c| table.column(c, || "split.group_columns".into()))
        .collect::<Result<_, _>>()?;
    let previous = match &opts.previous {
        Some(p) => Some(load_previous(p, schema)?),
        None => None,
    };
    let seed = opts.seed.unwrap_or(schema.split.seed);

    // Ids and paths.
    let mut removed: Vec<Removed> = Vec::new();
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut seen_ids: HashMap<String, usize> = HashMap::new();
    for (r, rec) in table.records.iter().enumerate() {
        let text = |i: usize| rec.fields[i].as_ref().map(|f| f.text().trim().to_string()).unwrap_or_default();
        let (id, image) = (text(id_idx), text(image_idx));
        let mut remove = |reason, detail: String| {
            removed.push(Removed { id: id.clone(), line: rec.line, image: image.clone(), reason, detail });
        };
        if id.is_empty() {
            remove(Reason::MissingId, format!("empty {id_col:?}"));
        } else if let Some(first) = seen_ids.get(&id) {
            remove(Reason::DuplicateId, format!("id already used on line {first}"));
        } else if !is_safe_relative(&image) {
            seen_ids.insert(id.clone(), rec.line);
            remove(Reason::BadPath, format!("{image:?} is not a relative path below the image root"));
        } else {
            seen_ids.insert(id.clone(), rec.line);
            candidates.push(Candidate { record: r, id, image });
        }
    }

    // Scan each distinct path once.
    let mut path_index: HashMap<String, usize> = HashMap::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    for c in &candidates {
        path_index.entry(c.image.clone()).or_insert_with(|| {
            paths.push(image_root.join(&c.image));
            paths.len() - 1
        });
    }
    let scan_started = std::time::Instant::now();
    let scanned = scan::scan_all(&paths, &schema.images, opts.progress);
    tracing::info!(images = paths.len(), seconds = scan_started.elapsed().as_secs_f64(), "scanned images");
    let mut valid: Vec<(Candidate, &scan::ImageInfo)> = Vec::new();
    for c in candidates {
        match &scanned[path_index[&c.image]] {
            Scanned::Valid(info) => valid.push((c, info)),
            Scanned::Invalid { reason, detail } => removed.push(Removed {
                id: c.id,
                line: table.records[c.record].line,
                image: c.image,
                reason: *reason,
                detail: detail.clone(),
            }),
        }
    }
    let mut canon: Vec<Vec<Canon>> =
        valid.iter().map(|(c, _)| compiled.canonical(&table.records[c.record].fields, &columns)).collect();
    let attr_names: Vec<String> = compiled.attribute_names().map(String::from).collect();

    // Exact duplicates: conflicts, then copies.
    let mut by_sha: BTreeMap<[u8; 32], Vec<usize>> = BTreeMap::new();
    for (i, (_, info)) in valid.iter().enumerate() {
        by_sha.entry(info.sha256).or_default().push(i);
    }
    let mut conflicts: Vec<Conflict> = Vec::new();
    let mut drop = vec![false; valid.len()];
    for members in by_sha.values().filter(|m| m.len() > 1) {
        let key = members.iter().map(|&i| valid[i].0.id.as_str()).min().unwrap_or_default().to_string();
        let view: Vec<(&str, &[Canon])> =
            members.iter().map(|&i| (valid[i].0.id.as_str(), canon[i].as_slice())).collect();
        let found = dedup::conflicts("exact", &key, &view, &attr_names);
        if schema.duplicates.exact_conflicts == ConflictPolicy::Missing {
            for c in &found {
                // Invariant: conflicts only name attributes from `attr_names`.
                let a = attr_names.iter().position(|n| *n == c.attribute).expect("conflict names a known attribute");
                for &i in members {
                    if matches!(canon[i][a], Canon::Values(_)) {
                        canon[i][a] = Canon::Missing;
                    }
                }
            }
        }
        conflicts.extend(found);
        if schema.duplicates.drop_exact_copies {
            // `members` is in input order, so the first record keeps its place.
            let kept = &valid[members[0]].0.id;
            for &i in &members[1..] {
                drop[i] = true;
                let (c, _) = &valid[i];
                removed.push(Removed {
                    id: c.id.clone(),
                    line: table.records[c.record].line,
                    image: c.image.clone(),
                    reason: Reason::ExactDuplicate,
                    detail: format!("same file content as {kept}"),
                });
            }
        }
    }
    let keep: Vec<usize> = (0..valid.len()).filter(|&i| !drop[i]).collect();
    if keep.is_empty() {
        report::write_removed(&opts.out, &removed)?;
        return Err(CurateError::NothingLeft { removed: removed.len() });
    }
    let kept: Vec<(&Candidate, &scan::ImageInfo)> = keep.iter().map(|&i| (&valid[i].0, valid[i].1)).collect();
    let kept_canon: Vec<Vec<Canon>> = keep.iter().map(|&i| std::mem::take(&mut canon[i])).collect();

    // Groups among the kept items.
    let n = kept.len();
    let mut exact_uf = dedup::UnionFind::new(n);
    let mut first_with_sha: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, (_, info)) in kept.iter().enumerate() {
        let first = *first_with_sha.entry(info.sha256).or_insert(i);
        exact_uf.union(first, i);
    }
    let mut near_uf = exact_uf.clone();
    if schema.duplicates.near {
        let infos: Vec<&scan::ImageInfo> = kept.iter().map(|(_, info)| *info).collect();
        let t = std::time::Instant::now();
        let joined = dedup::near_duplicates(
            &infos,
            schema.duplicates.near_max_distance,
            schema.duplicates.near_min_correlation,
            &mut near_uf,
        );
        tracing::info!(joined, seconds = t.elapsed().as_secs_f64(), "found near duplicates");
        for members in near_uf.groups(2) {
            let distinct: std::collections::HashSet<&[u8; 32]> = members.iter().map(|&i| &kept[i].1.sha256).collect();
            if distinct.len() < 2 {
                continue;
            }
            let key = members.iter().map(|&i| kept[i].0.id.as_str()).min().unwrap_or_default().to_string();
            let view: Vec<(&str, &[Canon])> =
                members.iter().map(|&i| (kept[i].0.id.as_str(), kept_canon[i].as_slice())).collect();
            conflicts.extend(dedup::conflicts("near", &key, &view, &attr_names));
        }
    }
    let mut split_uf = match schema.split.group_by {
        GroupBy::Near => near_uf,
        GroupBy::Exact => exact_uf,
        GroupBy::Item => dedup::UnionFind::new(n),
    };
    for &col in &group_cols {
        let mut first: HashMap<String, usize> = HashMap::new();
        for (i, (c, _)) in kept.iter().enumerate() {
            let value = table.records[c.record].fields[col].as_ref().map(|f| f.text().trim().to_string());
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                let f = *first.entry(v).or_insert(i);
                split_uf.union(f, i);
            }
        }
    }

    // Labels.
    let finalized = schema::finalize(&compiled, &kept_canon);
    let stratify = schema.split.stratify.as_ref().and_then(|s| attr_names.iter().position(|n| n == s));

    // Split.
    let groups = split_uf.groups(1);
    let prev_split = |id: &str| previous.as_ref().and_then(|p| p.splits.get(id).copied());
    let inputs: Vec<split::GroupInput> = groups
        .iter()
        .map(|members| {
            let mut ids: Vec<(&str, usize)> = members.iter().map(|&i| (kept[i].0.id.as_str(), i)).collect();
            ids.sort();
            let stratum = stratify.and_then(|a| {
                ids.iter().find_map(|&(_, i)| match finalized[a].labels[i] {
                    Label::Class(c) => Some(c),
                    _ => None,
                })
            });
            split::GroupInput {
                key: ids[0].0.to_string(),
                size: members.len(),
                stratum,
                pinned: ids.iter().filter_map(|(id, _)| prev_split(id)).collect(),
            }
        })
        .collect();
    let fractions = [schema.split.train, schema.split.val, schema.split.test];
    let assigned = split::assign(&inputs, seed, fractions);
    let mut items: Vec<Item> = Vec::with_capacity(n);
    let mut spanning_groups = 0;
    let mut kept_splits = 0;
    for ((members, input), group_split) in groups.iter().zip(&inputs).zip(&assigned) {
        let mut splits_here = std::collections::BTreeSet::new();
        for &i in members {
            let (c, info) = kept[i];
            let split = match prev_split(&c.id) {
                Some(s) => {
                    kept_splits += 1;
                    s
                }
                None => *group_split,
            };
            splits_here.insert(split);
            items.push(Item {
                id: c.id.clone(),
                image: c.image.clone(),
                sha256: hex::encode(info.sha256),
                group: input.key.clone(),
                split,
                labels: finalized.iter().map(|f| f.labels[i].clone()).collect(),
            });
        }
        if splits_here.len() > 1 {
            spanning_groups += 1;
            tracing::warn!(group = %input.key, splits = ?splits_here, "a new item joined items from different previous splits");
        }
    }
    let attributes: Vec<Attribute> = compiled
        .attrs
        .iter()
        .zip(&finalized)
        .map(|(a, f)| Attribute {
            name: a.cfg.name.clone(),
            kind: a.cfg.kind,
            classes: f.classes.clone(),
            applies_to: f.applies_to.clone(),
        })
        .collect();
    let split_info = SplitInfo {
        seed,
        train: schema.split.train,
        val: schema.split.val,
        test: schema.split.test,
        group_by: schema.split.group_by,
        group_columns: schema.split.group_columns.clone(),
        stratify: schema.split.stratify.clone(),
        previous: previous.as_ref().map(|p| p.fingerprint.clone()),
    };
    let dataset = Dataset::new(image_root, split_info, attributes, items);

    removed.sort_by(|a, b| (a.line, &a.id).cmp(&(b.line, &b.id)));
    conflicts.sort_by(|a, b| (a.kind, &a.group, &a.attribute).cmp(&(b.kind, &b.group, &b.attribute)));
    let mut by_reason: BTreeMap<Reason, usize> = BTreeMap::new();
    for r in &removed {
        *by_reason.entry(r.reason).or_default() += 1;
    }
    let mut split_items = [0; 3];
    for it in &dataset.items {
        split_items[it.split.index()] += 1;
    }
    let mut summary = Summary {
        records: table.records.len(),
        kept: dataset.items.len(),
        removed: by_reason,
        split_items,
        groups: groups.len(),
        grouped_items: groups.iter().filter(|g| g.len() > 1).map(Vec::len).sum(),
        exact_conflicts: conflicts.iter().filter(|c| c.kind == "exact").count(),
        near_conflicts: conflicts.iter().filter(|c| c.kind == "near").count(),
        spanning_groups,
        kept_splits,
        fingerprint: dataset.fingerprint.clone(),
        out: opts.out.clone(),
        report: opts.out.join(report::REPORT_FILE),
        seconds: 0.0,
    };
    std::fs::create_dir_all(&opts.out).map_err(|source| CurateError::Write { path: opts.out.clone(), source })?;
    dataset.write(&opts.out)?;
    let notes = report::Notes {
        rare: compiled.attrs.iter().zip(&finalized).map(|(a, f)| (a.cfg.name.clone(), f.rare.clone())).collect(),
        unknown_condition_values: compiled
            .attrs
            .iter()
            .zip(&finalized)
            .filter(|(_, f)| !f.unknown_condition_values.is_empty())
            .map(|(a, f)| (a.cfg.name.clone(), f.unknown_condition_values.clone()))
            .collect(),
        format,
        labels: opts.labels.clone(),
    };
    summary.seconds = started.elapsed().as_secs_f64();
    report::write_all(&opts.out, &dataset, &removed, &conflicts, &summary, &notes)?;
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        kept = summary.kept,
        removed = removed.len(),
        train = split_items[0],
        val = split_items[1],
        test = split_items[2],
        fingerprint = %dataset.fingerprint,
        seconds = summary.seconds,
        "curated dataset"
    );
    Ok(Outcome { dataset, removed, conflicts, summary })
}

/// What a run needs from the previous dataset.
struct Previous {
    fingerprint: String,
    splits: HashMap<String, Split>,
}

fn load_previous(path: &Path, schema: &Schema) -> Result<Previous, CurateError> {
    let ds = Dataset::load(path)?;
    let fractions = [schema.split.train, schema.split.val, schema.split.test];
    if fractions != [ds.split.train, ds.split.val, ds.split.test] {
        // Keeping old items in place while targeting other proportions would skew the new items to compensate.
        tracing::warn!(
            previous = ?[ds.split.train, ds.split.val, ds.split.test],
            now = ?fractions,
            "split fractions changed since the previous dataset; new items are balanced towards the new fractions"
        );
    }
    let splits = ds.items.iter().map(|it| (it.id.clone(), it.split)).collect();
    tracing::info!(path = %path.display(), items = ds.items.len(), fingerprint = %ds.fingerprint, "keeping previous splits");
    Ok(Previous { fingerprint: ds.fingerprint, splits })
}
