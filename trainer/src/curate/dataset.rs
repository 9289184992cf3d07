//! The curated dataset: `dataset.json` and its typed, validated in-memory form, [`Dataset`].
//!
//! Layout of `dataset.json` (format version 1):
//! - `format_version`, `fingerprint` (`sha256:<hex>`, see below), `image_root` (absolute; item paths are relative to
//!   it), `split` (how the split was made), `attributes` (name, kind, ordered class list, `applies_to`), `items`.
//! - Each item: `id`, `image` (relative, `/`-separated), `sha256` of the image file, `group` (items with the same
//!   group are duplicates, or share a grouping column, and always share a split), `split` (`train`/`val`/`test`),
//!   and `labels`: attribute name → class index (single-label), list of class indexes (multi-label), `"missing"`
//!   (applicable but unknown) or `"n/a"` (the attribute does not apply to this item).
//!
//! The **fingerprint** is the SHA-256 of the compact JSON of `{format_version, attributes, items}` with items sorted
//! by id and labels keyed by attribute name in byte order: the same schema, images, labels and splits always give
//! the same fingerprint, wherever the images live and whatever else changed (the report, the image root).

use super::CurateError;
use super::schema::{Condition, GroupBy, Kind};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Version of the `dataset.json` layout this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a curated dataset directory.
pub const MANIFEST_FILE: &str = "dataset.json";

/// One of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One item's label for one attribute.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Label {
    /// Index into the attribute's classes (single-label).
    Class(u32),
    /// Class indexes, ascending (multi-label); may be empty when the item has none of the classes.
    Multi(Vec<u32>),
    /// The attribute applies but its value is unknown (not labelled, rare value dropped, conflicting copies).
    Missing,
    /// The attribute does not apply to this item (e.g. a sleeve length for shoes).
    NotApplicable,
}

const MISSING: &str = "missing";
const NOT_APPLICABLE: &str = "n/a";

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Label::Class(c) => s.serialize_u32(*c),
            Label::Multi(v) => v.serialize(s),
            Label::Missing => s.serialize_str(MISSING),
            Label::NotApplicable => s.serialize_str(NOT_APPLICABLE),
        }
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Class(u32),
            Multi(Vec<u32>),
            Mark(String),
        }
        match Repr::deserialize(d)? {
            Repr::Class(c) => Ok(Label::Class(c)),
            Repr::Multi(v) => Ok(Label::Multi(v)),
            Repr::Mark(m) if m == MISSING => Ok(Label::Missing),
            Repr::Mark(m) if m == NOT_APPLICABLE => Ok(Label::NotApplicable),
            Repr::Mark(m) => Err(serde::de::Error::custom(format!(
                "label {m:?} is neither a class index, a list of them, {MISSING:?} nor {NOT_APPLICABLE:?}"
            ))),
        }
    }
}

/// An attribute as curated: its classes in output order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attribute {
    /// Head name.
    pub name: String,
    /// Single- or multi-label.
    pub kind: Kind,
    /// Class names; labels are indexes into this list.
    pub classes: Vec<String>,
    /// When the attribute applies (absent: always). An `attribute` condition lists only values that are classes of
    /// that attribute, so it can be copied into the bundle manifest's `applies_to` as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies_to: Option<Condition>,
}

/// How the split was made, for provenance and for keeping it on the next run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitInfo {
    /// Seed of the keyed hash that ordered the groups.
    pub seed: u64,
    /// Target fraction of items for training.
    pub train: f64,
    /// Target fraction of items for validation.
    pub val: f64,
    /// Target fraction of items for testing.
    pub test: f64,
    /// Which duplicates were kept together.
    pub group_by: GroupBy,
    /// Columns whose equal values were kept together.
    pub group_columns: Vec<String>,
    /// Attribute whose classes were split proportionally.
    pub stratify: Option<String>,
    /// Fingerprint of the dataset whose splits this one kept, if any.
    pub previous: Option<String>,
}

/// One curated item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    /// Image path relative to [`Dataset::image_root`], `/`-separated.
    pub image: String,
    /// SHA-256 of the image file, hex.
    pub sha256: String,
    /// Split group: items with the same group always share a split.
    pub group: String,
    pub split: Split,
    /// One label per attribute, in [`Dataset::attributes`] order.
    pub labels: Vec<Label>,
}

/// A curated dataset, as `trainer curate` writes it and training reads it.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub format_version: u32,
    /// `sha256:<hex>` over the attributes and items (see the module docs).
    pub fingerprint: String,
    /// Directory the item image paths are relative to.
    pub image_root: PathBuf,
    pub split: SplitInfo,
    pub attributes: Vec<Attribute>,
    /// Items sorted by id.
    pub items: Vec<Item>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemFile {
    id: String,
    image: String,
    sha256: String,
    group: String,
    split: Split,
    labels: BTreeMap<String, Label>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetFile {
    format_version: u32,
    fingerprint: String,
    image_root: PathBuf,
    split: SplitInfo,
    attributes: Vec<Attribute>,
    items: Vec<ItemFile>,
}

#[derive(Serialize)]
struct Canonical<'a> {
    format_version: u32,
    attributes: &'a [Attribute],
    items: &'a [ItemFile],
}

fn fingerprint(attributes: &[Attribute], items: &[ItemFile]) -> String {
    let canonical = Canonical { format_version: FORMAT_VERSION, attributes, items };
    // Invariant: these types serialize to JSON infallibly (string keys, no non-finite floats).
    let bytes = serde_json::to_vec(&canonical).expect("dataset serializes to JSON");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

fn to_files(attributes: &[Attribute], items: &[Item]) -> Vec<ItemFile> {
    items
        .iter()
        .map(|it| ItemFile {
            id: it.id.clone(),
            image: it.image.clone(),
            sha256: it.sha256.clone(),
            group: it.group.clone(),
            split: it.split,
            labels: attributes.iter().zip(&it.labels).map(|(a, l)| (a.name.clone(), l.clone())).collect(),
        })
        .collect()
}

impl Dataset {
    /// Assembles a dataset (items are sorted by id) and computes its fingerprint.
    pub(crate) fn new(image_root: PathBuf, split: SplitInfo, attributes: Vec<Attribute>, mut items: Vec<Item>) -> Self {
        items.sort_by(|a, b| a.id.cmp(&b.id));
        let fingerprint = fingerprint(&attributes, &to_files(&attributes, &items));
        Dataset { format_version: FORMAT_VERSION, fingerprint, image_root, split, attributes, items }
    }

    /// Loads `dir/dataset.json` (or `dir` itself when it is a file) and checks it: format version, fingerprint,
    /// every label against its attribute's kind and classes, unique ids, relative image paths.
    pub fn load(dir: &Path) -> Result<Dataset, CurateError> {
        let path = if dir.is_file() { dir.to_path_buf() } else { dir.join(MANIFEST_FILE) };
        let read_err = |source| CurateError::ReadManifest { path: path.clone(), source };
        let bytes = std::fs::read(&path).map_err(|e| read_err(Box::new(e)))?;
        let file: DatasetFile = serde_json::from_slice(&bytes).map_err(|e| read_err(Box::new(e)))?;
        let invalid = |reason: String| CurateError::InvalidManifest { path: path.clone(), reason };
        if file.format_version != FORMAT_VERSION {
            return Err(invalid(format!(
                "format_version is {}, this trainer reads {FORMAT_VERSION}",
                file.format_version
            )));
        }
        let computed = fingerprint(&file.attributes, &file.items);
        if computed != file.fingerprint {
            return Err(invalid(format!(
                "fingerprint {} does not match the content ({computed}); the file was edited or damaged",
                file.fingerprint
            )));
        }
        let index: HashMap<&str, usize> =
            file.attributes.iter().enumerate().map(|(i, a)| (a.name.as_str(), i)).collect();
        if index.len() != file.attributes.len() {
            return Err(invalid("two attributes have the same name".into()));
        }
        let mut ids = HashSet::new();
        let mut items = Vec::with_capacity(file.items.len());
        for it in file.items {
            if !ids.insert(it.id.clone()) {
                return Err(invalid(format!("item id {:?} appears twice", it.id)));
            }
            if !is_safe_relative(&it.image) {
                return Err(invalid(format!(
                    "item {:?}: image path {:?} is not relative to the root",
                    it.id, it.image
                )));
            }
            let mut labels = vec![None; file.attributes.len()];
            for (name, label) in it.labels {
                let Some(&a) = index.get(name.as_str()) else {
                    return Err(invalid(format!("item {:?} has a label for unknown attribute {name:?}", it.id)));
                };
                check_label(&file.attributes[a], &label)
                    .map_err(|why| invalid(format!("item {:?}, attribute {name:?}: {why}", it.id)))?;
                labels[a] = Some(label);
            }
            let labels = labels
                .into_iter()
                .zip(&file.attributes)
                .map(|(l, a)| l.ok_or_else(|| invalid(format!("item {:?} has no label for {:?}", it.id, a.name))))
                .collect::<Result<Vec<_>, _>>()?;
            items.push(Item {
                id: it.id,
                image: it.image,
                sha256: it.sha256,
                group: it.group,
                split: it.split,
                labels,
            });
        }
        tracing::debug!(path = %path.display(), items = items.len(), fingerprint = %file.fingerprint, "loaded dataset");
        Ok(Dataset {
            format_version: file.format_version,
            fingerprint: file.fingerprint,
            image_root: file.image_root,
            split: file.split,
            attributes: file.attributes,
            items,
        })
    }

    /// Writes `dir/dataset.json` (compact JSON; it is large).
    pub(crate) fn write(&self, dir: &Path) -> Result<PathBuf, CurateError> {
        let path = dir.join(MANIFEST_FILE);
        let file = DatasetFile {
            format_version: self.format_version,
            fingerprint: self.fingerprint.clone(),
            image_root: self.image_root.clone(),
            split: self.split.clone(),
            attributes: self.attributes.clone(),
            items: to_files(&self.attributes, &self.items),
        };
        // Invariant: see `fingerprint`.
        let bytes = serde_json::to_vec(&file).expect("dataset serializes to JSON");
        std::fs::write(&path, bytes).map_err(|source| CurateError::Write { path: path.clone(), source })?;
        Ok(path)
    }

    /// The items of one split, in id order.
    pub fn items(&self, split: Split) -> impl Iterator<Item = &Item> + '_ {
        self.items.iter().filter(move |it| it.split == split)
    }

    /// Index of the attribute called `name`.
    pub fn attribute(&self, name: &str) -> Option<usize> {
        self.attributes.iter().position(|a| a.name == name)
    }

    /// Where an item's image is.
    pub fn image_path(&self, item: &Item) -> PathBuf {
        self.image_root.join(&item.image)
    }

    /// Points the dataset at images that moved (the fingerprint does not depend on where they are).
    pub fn with_image_root(mut self, root: PathBuf) -> Self {
        self.image_root = root;
        self
    }

    /// Label statistics of attribute `attr` over one split (or all items).
    pub fn counts(&self, attr: usize, split: Option<Split>) -> LabelCounts {
        let mut c = LabelCounts { classes: vec![0; self.attributes[attr].classes.len()], ..LabelCounts::default() };
        for it in self.items.iter().filter(|it| split.is_none_or(|s| it.split == s)) {
            c.items += 1;
            match &it.labels[attr] {
                Label::Class(k) => c.classes[*k as usize] += 1,
                Label::Multi(ks) => ks.iter().for_each(|k| c.classes[*k as usize] += 1),
                Label::Missing => c.missing += 1,
                Label::NotApplicable => c.not_applicable += 1,
            }
        }
        c
    }
}

/// How often each class, "missing" and "not applicable" occur.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelCounts {
    /// Items counted.
    pub items: usize,
    /// Examples per class (a multi-label item counts once per class it has).
    pub classes: Vec<usize>,
    pub missing: usize,
    pub not_applicable: usize,
}

fn check_label(a: &Attribute, label: &Label) -> Result<(), String> {
    let n = a.classes.len();
    let in_range =
        |k: u32| if (k as usize) < n { Ok(()) } else { Err(format!("class index {k} is out of range ({n} classes)")) };
    match (a.kind, label) {
        (_, Label::Missing | Label::NotApplicable) => Ok(()),
        (Kind::Single, Label::Class(k)) => in_range(*k),
        (Kind::Multi, Label::Multi(ks)) => {
            if ks.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("class indexes {ks:?} are not strictly ascending"));
            }
            ks.iter().try_for_each(|k| in_range(*k))
        }
        (Kind::Single, Label::Multi(_)) => Err("a list of classes for a single-label attribute".into()),
        (Kind::Multi, Label::Class(_)) => Err("a single class index for a multi-label attribute".into()),
    }
}

/// A relative path that stays below its root: no absolute paths, no `..`, no empty components.
pub(crate) fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains(':')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Dataset {
        let attributes = vec![
            Attribute {
                name: "colour".into(),
                kind: Kind::Single,
                classes: vec!["Blue".into(), "Red".into()],
                applies_to: None,
            },
            Attribute {
                name: "tags".into(),
                kind: Kind::Multi,
                classes: vec!["a".into(), "b".into()],
                applies_to: None,
            },
        ];
        let split = SplitInfo {
            seed: 1,
            train: 0.8,
            val: 0.1,
            test: 0.1,
            group_by: GroupBy::Near,
            group_columns: vec![],
            stratify: None,
            previous: None,
        };
        let item = |id: &str, split, labels| Item {
            id: id.into(),
            image: format!("img/{id}.jpg"),
            sha256: "ab".repeat(32),
            group: id.into(),
            split,
            labels,
        };
        Dataset::new(
            "/data".into(),
            split,
            attributes,
            vec![
                item("2", Split::Test, vec![Label::NotApplicable, Label::Multi(vec![])]),
                item("1", Split::Train, vec![Label::Class(1), Label::Multi(vec![0, 1])]),
                item("3", Split::Train, vec![Label::Missing, Label::Missing]),
            ],
        )
    }

    #[test]
    fn round_trip_and_accessors() {
        let dir = tempfile::tempdir().unwrap();
        let ds = sample();
        ds.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(text.contains(r#""labels":{"colour":"n/a","tags":[]}"#), "{text}");
        assert!(text.contains(r#""labels":{"colour":1,"tags":[0,1]}"#), "{text}");
        let back = Dataset::load(dir.path()).unwrap();
        assert_eq!(back.items, ds.items);
        assert_eq!(back.fingerprint, ds.fingerprint);
        assert_eq!(back.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
        assert_eq!(back.items(Split::Train).count(), 2);
        assert_eq!(back.image_path(&back.items[0]), Path::new("/data/img/1.jpg"));
        let c = back.counts(0, None);
        assert_eq!((c.items, c.classes.as_slice(), c.missing, c.not_applicable), (3, [0, 1].as_slice(), 1, 1));
        assert_eq!(back.counts(1, Some(Split::Train)).classes, [1, 1]);
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = sample();
        assert_eq!(a.fingerprint, sample().fingerprint);
        assert_eq!(a.fingerprint, sample().with_image_root("/elsewhere".into()).fingerprint);
        assert!(a.fingerprint.starts_with("sha256:") && a.fingerprint.len() == 7 + 64);
        let rebuild = |f: &dyn Fn(&mut Dataset)| {
            let mut d = sample();
            f(&mut d);
            Dataset::new(d.image_root, d.split, d.attributes, d.items).fingerprint
        };
        let changes: [&dyn Fn(&mut Dataset); 6] = [
            &|d| d.items[0].split = Split::Val,
            &|d| d.items[0].labels[0] = Label::Class(0),
            &|d| d.items[2].labels[0] = Label::NotApplicable,
            &|d| d.items[1].sha256 = "cd".repeat(32),
            &|d| d.attributes[0].classes[1] = "Rot".into(),
            &|d| d.items[0].group = "other".into(),
        ];
        for (i, change) in changes.iter().enumerate() {
            assert_ne!(rebuild(*change), a.fingerprint, "change {i} kept the fingerprint");
        }
        // Input order does not matter: items are sorted by id.
        assert_eq!(rebuild(&|d| d.items.reverse()), a.fingerprint);
    }

    #[test]
    fn load_rejects_edits_and_bad_labels() {
        let dir = tempfile::tempdir().unwrap();
        sample().write(dir.path()).unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen(r#""split":"test""#, r#""split":"train""#, 1)).unwrap();
        let err = Dataset::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not match the content"), "{err}");

        // A label that is out of range is reported even when the fingerprint was recomputed to match.
        let mut bad = sample();
        bad.items[0].labels[0] = Label::Class(5);
        let bad = Dataset::new(bad.image_root, bad.split, bad.attributes, bad.items);
        bad.write(dir.path()).unwrap();
        let err = Dataset::load(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("item \"1\", attribute \"colour\": class index 5 is out of range (2 classes)"), "{err}");
    }

    #[test]
    fn relative_paths() {
        for ok in ["a.jpg", "images/a.jpg", "x/y/z.png"] {
            assert!(is_safe_relative(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../a.jpg", "a/../../b", "a//b", "./a", "C:\\x", "a\\b"] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }
}
