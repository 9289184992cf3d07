//! The curation schema: which columns become which attributes and how raw values become classes. Read from TOML;
//! every table rejects unknown keys, and [`Schema::compile`] checks the rest (errors name the attribute and key).
//!
//! A raw value becomes a label in this order:
//! 1. **Source**: the attribute's `column`, or the first (single-label) / every (multi-label) `derive` rule whose
//!    regex matches the text of the `derive.from` columns. Multi-label cells are split on `delimiter`; JSONL lists
//!    are taken as they are. Values are trimmed; empty values and `missing_values` mean "unknown".
//! 2. **Renames and merges**: `rename` maps one raw value to a new name, `merge` maps several raw values to one
//!    class. Both look at raw values; a value may appear in only one of them.
//! 3. **Conditions** (`applies_when`): an attribute that only makes sense for some items is *not applicable* to the
//!    others, which is different from *missing* (applicable but unknown). A `column` condition looks at that raw
//!    column; an `attribute` condition looks at another attribute's final class, the way the daemon's
//!    `applies_to` does at inference (so its parent must be single-label and itself unconditional). When the
//!    condition's own input is unknown, the label is missing.
//! 4. **Minimum count**: values with fewer than `min_count` examples among the kept items are dropped (the label
//!    becomes missing) or folded into `other`, per `rare`.
//!
//! Class lists are sorted by name, with the `other` class last when rare values were folded into it.

use super::error::SchemaError;
use super::import::{Field, Table};
use super::{CurateError, Label};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

/// A curation schema, as read from TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Where each record's id and image path come from.
    #[serde(default)]
    pub source: SourceConfig,
    /// What makes an image invalid.
    #[serde(default)]
    pub images: ImageChecks,
    /// How duplicates are found and treated.
    #[serde(default)]
    pub duplicates: DuplicateConfig,
    /// How items are split into train, val and test.
    #[serde(default)]
    pub split: SplitConfig,
    /// The attributes, in the order the model's heads will have (`[[attribute]]` tables).
    #[serde(rename = "attribute")]
    pub attributes: Vec<AttributeConfig>,
}

/// Columns that identify a record. Ignored for ImageFolder input, whose records have fixed columns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Column with the item's unique id.
    pub id_column: String,
    /// Column with the image path, relative to the image root given on the command line.
    pub image_column: String,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig { id_column: "id".into(), image_column: "image".into() }
    }
}

/// Image validity checks. An image that fails one is removed with the check's reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageChecks {
    /// Smallest accepted width and height, in pixels (as displayed, i.e. after EXIF orientation).
    pub min_side: u32,
    /// A pixel is "content" when one of its channels differs from the image's median colour by more than this.
    pub blank_tolerance: u8,
    /// An image with a smaller fraction of content pixels is blank (a faint earring on white is about 0.005; a
    /// blank JPEG is 0).
    pub blank_min_content: f64,
    /// Largest accepted file, in bytes (the daemon's default limit).
    pub max_file_bytes: u64,
    /// Largest accepted image, in pixels, checked from the header before decoding.
    pub max_pixels: u64,
}

impl Default for ImageChecks {
    fn default() -> Self {
        let limits = attrd::preprocess::Limits::default();
        ImageChecks {
            min_side: 32,
            blank_tolerance: 16,
            blank_min_content: 0.001,
            max_file_bytes: limits.max_file_bytes,
            max_pixels: limits.max_pixels,
        }
    }
}

/// What happens to the attributes of exact copies whose labels disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The disagreeing attribute becomes missing for every copy: the same pixels cannot be both.
    Missing,
    /// Labels stay as they are (only reported).
    Keep,
}

/// Duplicate detection. Exact duplicates have the same file content (SHA-256); near duplicates have 256-bit
/// difference hashes (16×16 brightness gradients) within `near_max_distance` bits *and* 32×32 grey thumbnails that
/// correlate at least `near_min_correlation`. Duplicates are grouped transitively.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DuplicateConfig {
    /// Remove all but the first copy (in input order) of exactly identical files.
    pub drop_exact_copies: bool,
    /// What to do when exact copies carry different labels.
    pub exact_conflicts: ConflictPolicy,
    /// Look for near duplicates at all.
    pub near: bool,
    /// Largest Hamming distance (of 256 bits) between the difference hashes of near duplicates.
    pub near_max_distance: u32,
    /// Smallest Pearson correlation between the 32×32 grey thumbnails of near duplicates. The hash alone
    /// over-matches small products on white backgrounds (earrings chain into groups of hundreds); correlation
    /// ignores the background and brightness, so shade variants of one photo still match.
    pub near_min_correlation: f64,
}

impl Default for DuplicateConfig {
    fn default() -> Self {
        DuplicateConfig {
            drop_exact_copies: true,
            exact_conflicts: ConflictPolicy::Missing,
            near: true,
            near_max_distance: 16,
            near_min_correlation: 0.993,
        }
    }
}

/// Which duplicates must share a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// Near-duplicate groups (which contain the exact ones).
    Near,
    /// Exact-duplicate groups only.
    Exact,
    /// No grouping: every item on its own (copies may then land in different splits).
    Item,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Near => "near duplicates",
            GroupBy::Exact => "exact duplicates",
            GroupBy::Item => "item",
        }
    }
}

/// The train/val/test split. See [`super::split`] for the algorithm and its guarantees.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Seed of the keyed hash that orders groups; `--seed` overrides it.
    pub seed: u64,
    /// Fraction of items for training.
    pub train: f64,
    /// Fraction of items for validation.
    pub val: f64,
    /// Fraction of items for testing.
    pub test: f64,
    /// Which duplicate groups must stay within one split.
    pub group_by: GroupBy,
    /// Further columns whose equal, non-empty values must share a split (e.g. a SKU with several views, or a
    /// catalog's own duplicate annotations).
    pub group_columns: Vec<String>,
    /// Single-label attribute whose classes are split in the configured proportions each; none = one stratum.
    pub stratify: Option<String>,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            seed: 0,
            train: 0.8,
            val: 0.1,
            test: 0.1,
            group_by: GroupBy::Near,
            group_columns: Vec::new(),
            stratify: None,
        }
    }
}

/// Single-label (one class per item, softmax) or multi-label (a set of classes, sigmoid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Single,
    Multi,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Single => "single",
            Kind::Multi => "multi",
        }
    }
}

/// What happens to values with fewer than `min_count` examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RarePolicy {
    /// The label becomes missing.
    Drop,
    /// The value is folded into the `other` class.
    Other,
}

/// One attribute (a model head).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeConfig {
    /// The attribute's name: the head name in the model bundle.
    pub name: String,
    /// Column holding the value; defaults to `name` unless `derive` is given.
    pub column: Option<String>,
    /// Derive the value from text columns instead of reading it from a column.
    pub derive: Option<DeriveConfig>,
    /// Single- or multi-label.
    #[serde(default = "single")]
    pub kind: Kind,
    /// Separator of the values in a multi-label text cell (default ","); multi-label only.
    pub delimiter: Option<String>,
    /// Raw values that mean "unknown" (empty values always do), e.g. "NA".
    #[serde(default)]
    pub missing_values: Vec<String>,
    /// Raw value → new name, e.g. `"Tshirts" = "T-shirt"`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Class → the raw values merged into it, e.g. `Blue = ["Navy Blue", "Teal"]`.
    #[serde(default)]
    pub merge: BTreeMap<String, Vec<String>>,
    /// Classes with fewer examples (among the kept items) are handled per `rare`.
    #[serde(default = "one")]
    pub min_count: usize,
    /// Drop rare values (label missing) or fold them into `other`.
    #[serde(default = "drop")]
    pub rare: RarePolicy,
    /// Name of the class rare values are folded into.
    #[serde(default = "other")]
    pub other: String,
    /// Only items meeting this condition have the attribute; for the rest it is not applicable.
    pub applies_when: Option<Condition>,
}

fn single() -> Kind {
    Kind::Single
}
fn one() -> usize {
    1
}
fn drop() -> RarePolicy {
    RarePolicy::Drop
}
fn other() -> String {
    "other".into()
}

/// When an attribute applies. Exactly one of `column` and `attribute` must be given.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// A raw column, e.g. `subCategory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Another attribute (single-label, unconditional); its final class is compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    /// The values for which the attribute applies.
    pub values: Vec<String>,
}

/// An attribute derived from text by ordered rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeriveConfig {
    /// Text columns, joined with spaces, that the rules search.
    pub from: Vec<String>,
    /// Rules in priority order: a single-label attribute takes the first match, a multi-label one every match.
    /// No match means the label is missing.
    pub rules: Vec<Rule>,
    /// Match case-sensitively (default: case-insensitive).
    #[serde(default)]
    pub case_sensitive: bool,
}

/// One text rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The value an item gets when the rule matches.
    pub value: String,
    /// Regular expression (Rust `regex` syntax) searched for in the text.
    pub pattern: String,
}

impl Schema {
    /// Reads and parses a schema file. Call [`compile`](Self::compile) to validate it.
    pub fn from_file(path: &Path) -> Result<Schema, CurateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CurateError::ReadSchema { path: path.to_path_buf(), source })?;
        Schema::from_toml(&text).map_err(|source| CurateError::ParseSchema { path: path.to_path_buf(), source })
    }

    /// Parses schema TOML.
    pub fn from_toml(text: &str) -> Result<Schema, Box<toml::de::Error>> {
        toml::from_str(text).map_err(Box::new)
    }

    /// Checks everything that can be checked without data and prepares the value mappings and regexes.
    pub fn compile(&self) -> Result<Compiled, SchemaError> {
        self.check_global()?;
        let mut names = HashSet::new();
        for a in &self.attributes {
            if a.name.trim().is_empty() {
                return Err(SchemaError::key("attribute.name", "is empty"));
            }
            if !names.insert(a.name.as_str()) {
                return Err(SchemaError::attr(&a.name, "name", "is used by two attributes"));
            }
        }
        let mut attrs = Vec::with_capacity(self.attributes.len());
        for a in &self.attributes {
            attrs.push(compile_attribute(a, &self.attributes)?);
        }
        if let Some(s) = &self.split.stratify {
            match self.attributes.iter().find(|a| &a.name == s) {
                None => return Err(SchemaError::key("split.stratify", format!("names unknown attribute {s:?}"))),
                Some(a) if a.kind == Kind::Multi => {
                    return Err(SchemaError::key("split.stratify", format!("attribute {s:?} is multi-label")));
                }
                Some(_) => {}
            }
        }
        Ok(Compiled { schema: self.clone(), attrs })
    }

    fn check_global(&self) -> Result<(), SchemaError> {
        if self.attributes.is_empty() {
            return Err(SchemaError::key("attribute", "the schema defines no [[attribute]]"));
        }
        let s = &self.split;
        for (key, v) in [("split.train", s.train), ("split.val", s.val), ("split.test", s.test)] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(SchemaError::key(key, format!("is {v}, must be in [0, 1]")));
            }
        }
        if (s.train + s.val + s.test - 1.0).abs() > 1e-6 {
            return Err(SchemaError::key(
                "split",
                format!(
                    "train + val + test = {} + {} + {} = {}, must be 1",
                    s.train,
                    s.val,
                    s.test,
                    s.train + s.val + s.test
                ),
            ));
        }
        if s.train <= 0.0 {
            return Err(SchemaError::key("split.train", "must be above 0"));
        }
        let i = &self.images;
        if i.min_side == 0 {
            return Err(SchemaError::key("images.min_side", "is 0, must be at least 1"));
        }
        if !(i.blank_min_content.is_finite() && (0.0..=1.0).contains(&i.blank_min_content)) {
            return Err(SchemaError::key(
                "images.blank_min_content",
                format!("is {}, must be in [0, 1]", i.blank_min_content),
            ));
        }
        if i.max_file_bytes == 0 || i.max_pixels == 0 {
            return Err(SchemaError::key("images", "max_file_bytes and max_pixels must be at least 1"));
        }
        let d = &self.duplicates;
        if d.near_max_distance > 127 {
            return Err(SchemaError::key(
                "duplicates.near_max_distance",
                format!("is {}, must be at most 127 of 256 bits (more matches unrelated images)", d.near_max_distance),
            ));
        }
        if !(d.near_min_correlation.is_finite() && (-1.0..=1.0).contains(&d.near_min_correlation)) {
            return Err(SchemaError::key(
                "duplicates.near_min_correlation",
                format!("is {}, must be in [-1, 1]", d.near_min_correlation),
            ));
        }
        if self.source.id_column.is_empty() || self.source.image_column.is_empty() {
            return Err(SchemaError::key("source", "id_column and image_column must not be empty"));
        }
        Ok(())
    }
}

fn compile_attribute(a: &AttributeConfig, all: &[AttributeConfig]) -> Result<CompiledAttr, SchemaError> {
    let err = |key: &str, msg: String| SchemaError::attr(&a.name, key, msg);
    let source = match (&a.column, &a.derive) {
        (Some(_), Some(_)) => return Err(err("column", "and derive are exclusive: give one".into())),
        (Some(c), None) if c.is_empty() => return Err(err("column", "is empty".into())),
        (Some(c), None) => ValueSource::Column(c.clone()),
        (None, None) => ValueSource::Column(a.name.clone()),
        (None, Some(d)) => {
            if d.from.is_empty() {
                return Err(err("derive.from", "lists no column".into()));
            }
            if d.rules.is_empty() {
                return Err(err("derive.rules", "is empty".into()));
            }
            let mut rules = Vec::with_capacity(d.rules.len());
            for (index, r) in d.rules.iter().enumerate() {
                if r.value.trim().is_empty() {
                    return Err(err(&format!("derive.rules[{index}].value"), "is empty".into()));
                }
                let re = RegexBuilder::new(&r.pattern).case_insensitive(!d.case_sensitive).build().map_err(|e| {
                    SchemaError::Regex {
                        attribute: a.name.clone(),
                        index,
                        pattern: r.pattern.clone(),
                        source: Box::new(e),
                    }
                })?;
                rules.push((r.value.trim().to_string(), re));
            }
            ValueSource::Derived { from: d.from.clone(), rules }
        }
    };
    let delimiter = match (a.kind, &a.delimiter) {
        (Kind::Single, Some(d)) => return Err(err("delimiter", format!("{d:?} is only for kind = \"multi\""))),
        (Kind::Single, None) => None,
        (Kind::Multi, Some(d)) if d.is_empty() => return Err(err("delimiter", "is empty".into())),
        (Kind::Multi, d) => Some(d.clone().unwrap_or_else(|| ",".into())),
    };
    // Renames and merges both act on raw values, so together they must be a function of the raw value.
    let mut map: HashMap<String, String> = HashMap::new();
    let mut origin: HashMap<String, String> = HashMap::new();
    for (from, to) in &a.rename {
        if to.trim().is_empty() {
            return Err(err(&format!("rename.{from:?}"), "renames to an empty name".into()));
        }
        map.insert(from.trim().to_string(), to.trim().to_string());
        origin.insert(from.trim().to_string(), format!("rename.{from:?}"));
    }
    for (to, froms) in &a.merge {
        if to.trim().is_empty() {
            return Err(err("merge", "has an empty class name".into()));
        }
        for from in froms {
            let here = format!("merge.{to:?}");
            if let Some(prev) = origin.get(from.trim()) {
                return Err(err(&here, format!("value {from:?} is also mapped by {prev}")));
            }
            map.insert(from.trim().to_string(), to.trim().to_string());
            origin.insert(from.trim().to_string(), here);
        }
    }
    if a.rare == RarePolicy::Other && a.other.trim().is_empty() {
        return Err(err("other", "is empty".into()));
    }
    let condition = match &a.applies_when {
        None => None,
        Some(c) => {
            if c.values.is_empty() {
                return Err(err("applies_when.values", "is empty".into()));
            }
            let values: BTreeSet<String> = c.values.iter().map(|v| v.trim().to_string()).collect();
            match (&c.column, &c.attribute) {
                (Some(col), None) => Some(CompiledCondition::Column { column: col.clone(), values }),
                (None, Some(parent)) => {
                    let Some(p) = all.iter().position(|x| &x.name == parent) else {
                        return Err(err("applies_when.attribute", format!("names unknown attribute {parent:?}")));
                    };
                    let pa = &all[p];
                    if pa.name == a.name || pa.kind != Kind::Single || pa.applies_when.is_some() {
                        return Err(err(
                            "applies_when.attribute",
                            format!("{parent:?} must be another single-label attribute that is itself unconditional"),
                        ));
                    }
                    Some(CompiledCondition::Attribute { parent: p, values })
                }
                _ => return Err(err("applies_when", "needs exactly one of column and attribute".into())),
            }
        }
    };
    let mut missing: HashSet<String> = a.missing_values.iter().map(|v| v.trim().to_string()).collect();
    missing.insert(String::new());
    if a.min_count == 0 {
        return Err(err("min_count", "is 0, must be at least 1 (1 keeps every value)".into()));
    }
    Ok(CompiledAttr { cfg: a.clone(), source, delimiter, map, missing, condition })
}

/// A validated schema, ready to label records.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub schema: Schema,
    pub(crate) attrs: Vec<CompiledAttr>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledAttr {
    pub cfg: AttributeConfig,
    source: ValueSource,
    delimiter: Option<String>,
    map: HashMap<String, String>,
    missing: HashSet<String>,
    pub condition: Option<CompiledCondition>,
}

#[derive(Debug, Clone)]
enum ValueSource {
    Column(String),
    Derived { from: Vec<String>, rules: Vec<(String, Regex)> },
}

#[derive(Debug, Clone)]
pub(crate) enum CompiledCondition {
    Column { column: String, values: BTreeSet<String> },
    Attribute { parent: usize, values: BTreeSet<String> },
}

/// An attribute's value for one item before rare values are handled: canonical names (after renames and merges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Canon {
    Missing,
    NotApplicable,
    /// One value (single-label) or the distinct values in source order (multi-label).
    Values(Vec<String>),
}

/// Column indexes an attribute reads, resolved against one table.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    value: Vec<usize>,
    condition: Option<usize>,
}

impl Compiled {
    pub fn attribute_names(&self) -> impl Iterator<Item = &str> {
        self.attrs.iter().map(|a| a.cfg.name.as_str())
    }

    /// Resolves every column the schema reads against `table`'s header; errors name the attribute and column.
    pub(crate) fn columns(&self, table: &Table) -> Result<Vec<Columns>, CurateError> {
        let mut out = Vec::with_capacity(self.attrs.len());
        for a in &self.attrs {
            let name = &a.cfg.name;
            let value = match &a.source {
                ValueSource::Column(c) => vec![table.column(c, || format!("attribute {name:?} (column)"))?],
                ValueSource::Derived { from, .. } => from
                    .iter()
                    .map(|c| table.column(c, || format!("attribute {name:?} (derive.from)")))
                    .collect::<Result<_, _>>()?,
            };
            let condition = match &a.condition {
                Some(CompiledCondition::Column { column, .. }) => {
                    Some(table.column(column, || format!("attribute {name:?} (applies_when.column)"))?)
                }
                _ => None,
            };
            out.push(Columns { value, condition });
        }
        Ok(out)
    }

    /// The canonical value of every attribute for one record. Attribute conditions are not applied here (they
    /// need the parent's final class, see [`finalize`]); column conditions are.
    pub(crate) fn canonical(&self, fields: &[Option<Field>], columns: &[Columns]) -> Vec<Canon> {
        self.attrs.iter().zip(columns).map(|(a, c)| a.canonical(fields, c)).collect()
    }
}

impl CompiledAttr {
    fn canonical(&self, fields: &[Option<Field>], cols: &Columns) -> Canon {
        if let (Some(CompiledCondition::Column { values, .. }), Some(ci)) = (&self.condition, cols.condition) {
            match fields[ci].as_ref().map(|f| f.text().trim().to_string()) {
                None => return Canon::Missing,
                Some(v) if v.is_empty() => return Canon::Missing,
                Some(v) if !values.contains(&v) => return Canon::NotApplicable,
                Some(_) => {}
            }
        }
        let raw: Vec<String> = match &self.source {
            ValueSource::Column(_) => match &fields[cols.value[0]] {
                None => Vec::new(),
                Some(Field::List(items)) => items.iter().map(|s| s.trim().to_string()).collect(),
                Some(Field::Text(s)) => match &self.delimiter {
                    Some(d) => s.split(d.as_str()).map(|v| v.trim().to_string()).collect(),
                    None => vec![s.trim().to_string()],
                },
            },
            ValueSource::Derived { rules, .. } => {
                let text: Vec<String> =
                    cols.value.iter().filter_map(|&i| fields[i].as_ref().map(|f| f.text().into_owned())).collect();
                let text = text.join(" ");
                let mut hits = rules.iter().filter(|(_, re)| re.is_match(&text)).map(|(v, _)| v.clone());
                match self.cfg.kind {
                    Kind::Single => hits.next().into_iter().collect(),
                    Kind::Multi => hits.collect(),
                }
            }
        };
        let mut out: Vec<String> = Vec::with_capacity(raw.len());
        for v in raw {
            if self.missing.contains(&v) {
                continue;
            }
            let v = self.map.get(&v).cloned().unwrap_or(v);
            if !out.contains(&v) {
                out.push(v);
            }
        }
        match (self.cfg.kind, out.len()) {
            (_, 0) => Canon::Missing,
            // A single-label attribute with several values (a JSONL list) has no one true class.
            (Kind::Single, n) if n > 1 => Canon::Missing,
            _ => Canon::Values(out),
        }
    }
}

/// The outcome of [`finalize`] for one attribute.
#[derive(Debug, Clone)]
pub(crate) struct Finalized {
    pub classes: Vec<String>,
    pub labels: Vec<Label>,
    /// Rare values: (value, examples, folded into `other`?).
    pub rare: Vec<(String, usize, bool)>,
    /// Condition values that are not classes of the parent (attribute conditions only).
    pub unknown_condition_values: Vec<String>,
    /// The condition as resolved: values restricted to classes of the parent.
    pub applies_to: Option<Condition>,
}

/// Turns the canonical values of the kept items into class lists and labels, attribute by attribute: parents
/// first, so that attribute conditions see final classes. `canon[item][attr]`.
pub(crate) fn finalize(compiled: &Compiled, canon: &[Vec<Canon>]) -> Vec<Finalized> {
    let n_attr = compiled.attrs.len();
    let mut done: Vec<Option<Finalized>> = vec![None; n_attr];
    let order: Vec<usize> = (0..n_attr)
        .filter(|&i| !matches!(compiled.attrs[i].condition, Some(CompiledCondition::Attribute { .. })))
        .chain(
            (0..n_attr).filter(|&i| matches!(compiled.attrs[i].condition, Some(CompiledCondition::Attribute { .. }))),
        )
        .collect();
    for a in order {
        let attr = &compiled.attrs[a];
        let (values, applies_to, unknown) = match &attr.condition {
            Some(CompiledCondition::Attribute { parent, values: cond }) => {
                // Invariant: parents are unconditional, so they were finalized in the first pass of `order`.
                let p = done[*parent].as_ref().expect("parent attribute finalized first");
                let applies: Vec<bool> = p.classes.iter().map(|c| cond.contains(c)).collect();
                let vals: Vec<Canon> = canon
                    .iter()
                    .zip(&p.labels)
                    .map(|(item, pl)| match pl {
                        Label::Class(c) if applies[*c as usize] => item[a].clone(),
                        Label::Class(_) => Canon::NotApplicable,
                        _ => Canon::Missing,
                    })
                    .collect();
                let known: Vec<String> = cond.iter().filter(|v| p.classes.contains(v)).cloned().collect();
                let unknown: Vec<String> = cond.iter().filter(|v| !p.classes.contains(v)).cloned().collect();
                let parent_name = compiled.attrs[*parent].cfg.name.clone();
                (vals, Some(Condition { column: None, attribute: Some(parent_name), values: known }), unknown)
            }
            Some(CompiledCondition::Column { column, values }) => {
                let vals = canon.iter().map(|item| item[a].clone()).collect();
                let cond = Condition {
                    column: Some(column.clone()),
                    attribute: None,
                    values: values.iter().cloned().collect(),
                };
                (vals, Some(cond), Vec::new())
            }
            None => (canon.iter().map(|item| item[a].clone()).collect(), None, Vec::new()),
        };
        let mut f = finalize_values(&attr.cfg, &values);
        f.applies_to = applies_to;
        f.unknown_condition_values = unknown;
        if !f.unknown_condition_values.is_empty() {
            tracing::warn!(
                attribute = %attr.cfg.name,
                values = ?f.unknown_condition_values,
                "applies_when values are not classes of the parent attribute; items with them count as not applicable"
            );
        }
        done[a] = Some(f);
    }
    // Invariant: `order` is a permutation of all attribute indexes, so every slot was filled.
    done.into_iter().map(|f| f.expect("every attribute finalized")).collect()
}

/// Counts values, handles rare ones, and assigns class indexes.
fn finalize_values(cfg: &AttributeConfig, values: &[Canon]) -> Finalized {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        if let Canon::Values(vs) = v {
            for s in vs {
                *counts.entry(s.as_str()).or_default() += 1;
            }
        }
    }
    let fold = cfg.rare == RarePolicy::Other;
    let rare: Vec<(String, usize, bool)> =
        counts.iter().filter(|(_, c)| **c < cfg.min_count).map(|(v, c)| (v.to_string(), *c, fold)).collect();
    let is_rare: HashSet<&str> = rare.iter().map(|(v, _, _)| v.as_str()).collect();
    let mut classes: Vec<String> = counts
        .keys()
        .filter(|v| !(is_rare.contains(*v) || (fold && **v == cfg.other)))
        .map(|v| v.to_string())
        .collect();
    // `other` goes last whenever it is used as the fold target, whether it also occurred as a raw value or not.
    let other_used = fold && (!rare.is_empty() || counts.contains_key(cfg.other.as_str()));
    if other_used {
        classes.push(cfg.other.clone());
    }
    let index: HashMap<&str, u32> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as u32)).collect();
    let map_one = |v: &str| -> Option<u32> {
        if is_rare.contains(v) {
            if fold { index.get(cfg.other.as_str()).copied() } else { None }
        } else {
            index.get(v).copied()
        }
    };
    let labels = values
        .iter()
        .map(|v| match v {
            Canon::Missing => Label::Missing,
            Canon::NotApplicable => Label::NotApplicable,
            Canon::Values(vs) => match cfg.kind {
                Kind::Single => map_one(&vs[0]).map_or(Label::Missing, Label::Class),
                Kind::Multi => {
                    let set: BTreeSet<u32> = vs.iter().filter_map(|v| map_one(v)).collect();
                    Label::Multi(set.into_iter().collect())
                }
            },
        })
        .collect();
    Finalized { classes, labels, rare, unknown_condition_values: Vec::new(), applies_to: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curate::import::Record;

    fn table(columns: &[&str], rows: &[&[&str]]) -> Table {
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let index = columns.iter().enumerate().map(|(i, c)| (c.clone(), i)).collect();
        let records = rows
            .iter()
            .enumerate()
            .map(|(i, r)| Record { line: i + 2, fields: r.iter().map(|v| Some(Field::Text(v.to_string()))).collect() })
            .collect();
        Table { path: "t.csv".into(), columns, index, records }
    }

    fn label(toml: &str, t: &Table) -> (Compiled, Vec<Finalized>) {
        let c = Schema::from_toml(toml).unwrap().compile().unwrap();
        let cols = c.columns(t).unwrap();
        let canon: Vec<Vec<Canon>> = t.records.iter().map(|r| c.canonical(&r.fields, &cols)).collect();
        let f = finalize(&c, &canon);
        (c, f)
    }

    fn names(f: &Finalized) -> Vec<String> {
        f.labels
            .iter()
            .map(|l| match l {
                Label::Class(i) => f.classes[*i as usize].clone(),
                Label::Missing => "?".into(),
                Label::NotApplicable => "n/a".into(),
                Label::Multi(v) => v.iter().map(|i| f.classes[*i as usize].as_str()).collect::<Vec<_>>().join("+"),
            })
            .collect()
    }

    #[test]
    fn merges_renames_and_missing_values() {
        let t = table(
            &["colour"],
            &[&["Navy Blue"], &["Teal"], &["Blue"], &[" Red "], &["Tshirts"], &["NA"], &[""], &["Green"]],
        );
        let (_, f) = label(
            r#"
            [[attribute]]
            name = "colour"
            missing_values = ["NA"]
            rename = { Tshirts = "T-shirt" }
            merge = { Blue = ["Navy Blue", "Teal"], Green = ["Olive"] }
            "#,
            &t,
        );
        assert_eq!(f[0].classes, ["Blue", "Green", "Red", "T-shirt"]);
        assert_eq!(names(&f[0]), ["Blue", "Blue", "Blue", "Red", "T-shirt", "?", "?", "Green"]);
    }

    #[test]
    fn min_count_drops_or_folds_into_other() {
        let rows: Vec<&[&str]> = vec![&["a"], &["a"], &["a"], &["b"], &["b"], &["c"], &["d"]];
        let t = table(&["v"], &rows);
        let base = "[[attribute]]\nname = \"v\"\nmin_count = 2\n";
        let (_, f) = label(base, &t);
        assert_eq!(f[0].classes, ["a", "b"]);
        assert_eq!(names(&f[0]), ["a", "a", "a", "b", "b", "?", "?"]);
        assert_eq!(f[0].rare, [("c".to_string(), 1, false), ("d".to_string(), 1, false)]);
        let (_, f) = label(&format!("{base}rare = \"other\"\nother = \"misc\"\n"), &t);
        assert_eq!(f[0].classes, ["a", "b", "misc"]);
        assert_eq!(names(&f[0]), ["a", "a", "a", "b", "b", "misc", "misc"]);
        // min_count 3 leaves only "a"; folding keeps the remaining classes sorted and `other` last.
        let (_, f) = label("[[attribute]]\nname = \"v\"\nmin_count = 3\nrare = \"other\"\n", &t);
        assert_eq!(f[0].classes, ["a", "other"]);
        // Counts are taken after merges: two rare raw values merged into one class can clear the minimum.
        let (_, f) = label(&format!("{base}merge = {{ cd = [\"c\", \"d\"] }}\n"), &t);
        assert_eq!(f[0].classes, ["a", "b", "cd"]);
    }

    #[test]
    fn column_condition_separates_not_applicable_from_missing() {
        let t = table(
            &["sub", "sleeve"],
            &[&["Topwear", "Long"], &["Topwear", ""], &["Shoes", "Long"], &["", "Short"], &["Topwear", "Short"]],
        );
        let (_, f) = label(
            "[[attribute]]\nname = \"sleeve\"\napplies_when = { column = \"sub\", values = [\"Topwear\"] }\n",
            &t,
        );
        assert_eq!(names(&f[0]), ["Long", "?", "n/a", "?", "Short"]);
        let cond = f[0].applies_to.as_ref().unwrap();
        assert_eq!((cond.column.as_deref(), cond.values.as_slice()), (Some("sub"), ["Topwear".to_string()].as_slice()));
    }

    #[test]
    fn attribute_condition_uses_the_parents_final_class() {
        let t = table(
            &["type", "pattern"],
            &[&["Shirt", "striped"], &["Shirt", "solid"], &["Shoe", "striped"], &["Kurta", "solid"], &["", "solid"]],
        );
        let (_, f) = label(
            r#"
            [[attribute]]
            name = "type"
            min_count = 1
            missing_values = []
            [[attribute]]
            name = "pattern"
            applies_when = { attribute = "type", values = ["Shirt", "Kurta", "Tunic"] }
            "#,
            &t,
        );
        assert_eq!(names(&f[1]), ["striped", "solid", "n/a", "solid", "?"]);
        assert_eq!(f[1].unknown_condition_values, ["Tunic"]);
        // With min_count 2, Kurta is rare and dropped: its pattern becomes missing, not "not applicable", because a
        // model that cannot predict Kurta cannot know whether the attribute applies.
        let t2 = table(&["type", "pattern"], &[&["Shirt", "striped"], &["Shirt", "solid"], &["Kurta", "solid"]]);
        let (_, f) = label(
            "[[attribute]]\nname = \"type\"\nmin_count = 2\n[[attribute]]\nname = \"pattern\"\napplies_when = { attribute = \"type\", values = [\"Shirt\", \"Kurta\"] }\n",
            &t2,
        );
        assert_eq!(names(&f[1]), ["striped", "solid", "?"]);
        assert_eq!(f[1].applies_to.as_ref().unwrap().values, ["Shirt"]);
    }

    #[test]
    fn text_rules_apply_in_order_and_no_match_is_missing() {
        let t = table(
            &["name"],
            &[
                &["Nike Men Striped Polo Tshirt"],
                &["Roadster Men Printed Striped Tshirt"],
                &["Arrow Men CHECKED Shirt"],
                &["Puma Men Solid Black Tshirt"],
                &["Puma Men Black Tshirt"],
                &["Checkers board"],
            ],
        );
        let rules = r#"
            [[attribute]]
            name = "pattern"
            [attribute.derive]
            from = ["name"]
            rules = [
                { value = "striped", pattern = '\bstripe[sd]?\b' },
                { value = "checked", pattern = '\bcheck(ed|s)?\b' },
                { value = "printed", pattern = '\bprint(ed|s)?\b' },
                { value = "solid", pattern = '\bsolid\b' },
            ]
        "#;
        let (_, f) = label(rules, &t);
        // "Printed Striped" takes the first rule in order, not the first word in the text.
        assert_eq!(names(&f[0]), ["striped", "striped", "checked", "solid", "?", "?"]);
        let multi = rules.replace("name = \"pattern\"", "name = \"pattern\"\nkind = \"multi\"");
        let (_, f) = label(&multi, &t);
        assert_eq!(names(&f[0]), ["striped", "printed+striped", "checked", "solid", "?", "?"]);
        let sensitive = rules.replace("from = [\"name\"]", "from = [\"name\"]\ncase_sensitive = true");
        let (_, f) = label(&sensitive, &table(&["name"], &[&["men striped tee"], &["Men Striped Tee"]]));
        assert_eq!(names(&f[0]), ["striped", "?"]);
    }

    #[test]
    fn multi_label_parsing() {
        let t = table(&["tags"], &[&["red| blue |red"], &["||"], &["green|Teal"], &["red"]]);
        let (_, f) = label(
            "[[attribute]]\nname = \"tags\"\nkind = \"multi\"\ndelimiter = \"|\"\nmerge = { blue = [\"Teal\"] }\n",
            &t,
        );
        assert_eq!(f[0].classes, ["blue", "green", "red"]);
        assert_eq!(
            f[0].labels,
            [Label::Multi(vec![0, 2]), Label::Missing, Label::Multi(vec![0, 1]), Label::Multi(vec![2])]
        );
        // JSONL lists are taken as they are; a rare value disappears from the set, leaving a (possibly empty) set.
        let compiled = Schema::from_toml("[[attribute]]\nname = \"tags\"\nkind = \"multi\"\nmin_count = 2\n")
            .unwrap()
            .compile()
            .unwrap();
        let mut t = table(&["tags"], &[]);
        for list in [vec!["a", "b"], vec!["a"], vec!["b", "c"], vec!["c"], vec!["z"]] {
            let field = Field::List(list.iter().map(|s| s.to_string()).collect());
            t.records.push(Record { line: 0, fields: vec![Some(field)] });
        }
        let cols = compiled.columns(&t).unwrap();
        let canon: Vec<_> = t.records.iter().map(|r| compiled.canonical(&r.fields, &cols)).collect();
        let f = finalize(&compiled, &canon);
        assert_eq!(f[0].classes, ["a", "b", "c"]);
        assert_eq!(f[0].labels[4], Label::Multi(vec![]));
    }

    fn compile_err(toml: &str) -> String {
        match Schema::from_toml(toml) {
            Err(e) => e.to_string(),
            Ok(s) => s.compile().unwrap_err().to_string(),
        }
    }

    #[test]
    fn errors_name_the_attribute_and_key() {
        let e = compile_err("[[attribute]]\nname = \"c\"\nmerge = { Blue = [\"Teal\"], Green = [\"Teal\"] }\n");
        assert_eq!(e, "attribute \"c\": merge.\"Green\": value \"Teal\" is also mapped by merge.\"Blue\"");
        let e = compile_err("[[attribute]]\nname = \"c\"\nrename = { Teal = \"x\" }\nmerge = { Blue = [\"Teal\"] }\n");
        assert!(e.contains("is also mapped by rename.\"Teal\""), "{e}");
        let e = compile_err(
            "[[attribute]]\nname = \"p\"\n[attribute.derive]\nfrom = [\"n\"]\nrules = [{ value = \"x\", pattern = \"(\" }]\n",
        );
        assert_eq!(e, "attribute \"p\": derive.rules[0].pattern \"(\" is not a valid regex");
        let e = compile_err("[[attribute]]\nname = \"c\"\ncolour = 1\n");
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = compile_err("[split]\nshuffle = true\n[[attribute]]\nname = \"c\"\n");
        assert!(e.contains("unknown field `shuffle`"), "{e}");
        let e = compile_err(
            "[[attribute]]\nname = \"a\"\napplies_when = { attribute = \"b\", values = [\"x\"] }\n[[attribute]]\nname = \"b\"\nkind = \"multi\"\n",
        );
        assert!(e.starts_with("attribute \"a\": applies_when.attribute: \"b\" must be another single-label"), "{e}");
        let e = compile_err("[split]\ntrain = 0.7\n[[attribute]]\nname = \"c\"\n");
        assert!(e.starts_with("split: train + val + test = 0.7 + 0.1 + 0.1"), "{e}");
        let e = compile_err("[split]\nstratify = \"nope\"\n[[attribute]]\nname = \"c\"\n");
        assert_eq!(e, "split.stratify: names unknown attribute \"nope\"");
        let e = compile_err("[[attribute]]\nname = \"c\"\ndelimiter = \",\"\n");
        assert_eq!(e, "attribute \"c\": delimiter: \",\" is only for kind = \"multi\"");
        let e = compile_err("[[attribute]]\nname = \"c\"\n[[attribute]]\nname = \"c\"\n");
        assert_eq!(e, "attribute \"c\": name: is used by two attributes");
    }

    #[test]
    fn missing_columns_are_named() {
        let c = Schema::from_toml("[[attribute]]\nname = \"colour\"\ncolumn = \"baseColour\"\n")
            .unwrap()
            .compile()
            .unwrap();
        let err = c.columns(&table(&["id", "colour"], &[])).unwrap_err().to_string();
        assert_eq!(
            err,
            "attribute \"colour\" (column) names column \"baseColour\", which t.csv does not have (columns: id, colour)"
        );
    }

    #[test]
    fn fashion_schema_compiles() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/fashion-schema.toml");
        let c = Schema::from_file(&path).unwrap().compile().unwrap();
        let names: Vec<&str> = c.attribute_names().collect();
        assert_eq!(names, ["gender", "articleType", "baseColour", "season", "usage", "pattern"]);
    }
}
