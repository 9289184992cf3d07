//! `trainer curate` on real catalog photos: a few thousand rows of the fashion data (with its known exact duplicates
//! that carry conflicting labels) plus broken images written for the test, through the library and the binary.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use trainer::curate::{self, Dataset, Label, MANIFEST_FILE, Options, Reason, Schema, Split};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real labelled product photos (`../shared/data/fashion`, or `ATTRD_DATA_DIR`).
fn fashion_dir() -> PathBuf {
    let p =
        std::env::var_os("ATTRD_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared/data/fashion"));
    assert!(p.join("labels.csv").is_file(), "{} has no labels.csv (set ATTRD_DATA_DIR)", p.display());
    p
}

fn fashion_schema() -> Schema {
    Schema::from_file(&repo().join("config/fashion-schema.toml")).unwrap()
}

type Row = BTreeMap<String, String>;

fn read_labels(dir: &Path) -> (Vec<String>, Vec<Row>) {
    let mut r = csv::Reader::from_path(dir.join("labels.csv")).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    let rows =
        r.records().map(|rec| header.iter().cloned().zip(rec.unwrap().iter().map(String::from)).collect()).collect();
    (header, rows)
}

fn write_csv(path: &Path, header: &[String], rows: &[Row]) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(header).unwrap();
    for row in rows {
        w.write_record(header.iter().map(|h| row.get(h).map(String::as_str).unwrap_or(""))).unwrap();
    }
    w.flush().unwrap();
}

/// Every 16th row of labels.csv plus every member of the first 150 exact duplicate groups and of the first 150 near
/// duplicate groups that hold more than one distinct image: about 3,500 real rows whose duplicates are complete.
fn subset(rows: &[Row]) -> Vec<Row> {
    let mut exact = BTreeSet::new();
    let mut images_of_near: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in rows {
        if !r["exact_dup_group"].is_empty() && exact.len() < 150 {
            exact.insert(r["exact_dup_group"].clone());
        }
        if !r["near_dup_group"].is_empty() {
            // Copies of one file count as one image.
            let image = if r["exact_dup_group"].is_empty() { &r["id"] } else { &r["exact_dup_group"] };
            images_of_near.entry(&r["near_dup_group"]).or_default().insert(image);
        }
    }
    let mut near = BTreeSet::new();
    for r in rows {
        let g = r["near_dup_group"].as_str();
        if !g.is_empty() && images_of_near[g].len() > 1 && near.len() < 150 {
            near.insert(g.to_string());
        }
    }
    rows.iter()
        .enumerate()
        .filter(|(i, r)| i % 16 == 0 || exact.contains(&r["exact_dup_group"]) || near.contains(&r["near_dup_group"]))
        .map(|(_, r)| r.clone())
        .collect()
}

/// A catalog in a temp dir: `images` links to the real photos, `broken/` holds the bad files the rows point at.
struct Catalog {
    dir: tempfile::TempDir,
    header: Vec<String>,
    rows: Vec<Row>,
}

impl Catalog {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn labels(&self) -> PathBuf {
        self.dir.path().join("labels.csv")
    }

    fn write_labels(&self, rows: &[Row]) -> PathBuf {
        let path = self.labels();
        write_csv(&path, &self.header, rows);
        path
    }
}

fn broken_row(template: &Row, id: &str, file: &str) -> Row {
    let mut r = template.clone();
    r.insert("id".into(), id.into());
    r.insert("file".into(), file.into());
    r.insert("exact_dup_group".into(), String::new());
    r.insert("near_dup_group".into(), String::new());
    r
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn catalog() -> Catalog {
    let data = fashion_dir();
    let (header, all) = read_labels(&data);
    let mut rows = subset(&all);
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(data.join("images"), dir.path().join("images")).unwrap();
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let real = std::fs::read(data.join("images/1163.jpg")).unwrap();
    std::fs::write(broken.join("truncated.jpg"), &real[..real.len() * 2 / 3]).unwrap();
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    std::fs::write(broken.join("random.jpg"), noise).unwrap();
    let tiny = image::RgbImage::from_fn(4, 4, |x, y| image::Rgb([(x * 60) as u8, (y * 60) as u8, 90]));
    std::fs::write(broken.join("tiny.jpg"), encode(&tiny, image::ImageFormat::Jpeg)).unwrap();
    let white = image::RgbImage::from_pixel(60, 80, image::Rgb([255, 255, 255]));
    std::fs::write(broken.join("white.png"), encode(&white, image::ImageFormat::Png)).unwrap();
    let t = rows[0].clone();
    rows.push(broken_row(&t, "broken-truncated", "broken/truncated.jpg"));
    rows.push(broken_row(&t, "broken-random", "broken/random.jpg"));
    rows.push(broken_row(&t, "broken-tiny", "broken/tiny.jpg"));
    rows.push(broken_row(&t, "broken-white", "broken/white.png"));
    rows.push(broken_row(&t, "broken-missing", "broken/missing.jpg"));
    rows.push(broken_row(&t, "broken-escape", "../labels.csv"));
    rows.push(broken_row(&t, "", "images/1164.jpg"));
    rows.push(broken_row(&t, "1163", "images/1164.jpg"));
    let c = Catalog { dir, header, rows };
    c.write_labels(&c.rows);
    c
}

fn options(c: &Catalog, labels: PathBuf, out: &Path) -> Options {
    Options {
        labels: Some(labels),
        images: c.root().to_path_buf(),
        out: out.to_path_buf(),
        format: None,
        seed: None,
        previous: None,
        progress: false,
    }
}

#[test]
fn curates_a_real_subset_with_broken_images_and_duplicates() {
    let c = catalog();
    let out = c.root().join("out");
    let outcome = curate::curate(&fashion_schema(), &options(&c, c.labels(), &out)).unwrap();
    let ds = &outcome.dataset;
    let removed: HashMap<&str, (Reason, &str)> =
        outcome.removed.iter().map(|r| (r.id.as_str(), (r.reason, r.detail.as_str()))).collect();

    // Each broken record is removed with its own reason.
    for (id, reason) in [
        ("broken-truncated", Reason::Truncated),
        ("broken-random", Reason::Undecodable),
        ("broken-tiny", Reason::TooSmall),
        ("broken-white", Reason::Blank),
        ("broken-missing", Reason::MissingFile),
        ("broken-escape", Reason::BadPath),
        ("", Reason::MissingId),
    ] {
        assert_eq!(removed.get(id).map(|r| r.0), Some(reason), "{id:?}: {:?}", removed.get(id));
    }
    let dup_id = outcome.removed.iter().find(|r| r.id == "1163" && r.reason == Reason::DuplicateId);
    assert!(dup_id.is_some(), "the second row with id 1163 is removed");
    assert!(removed["broken-tiny"].1.contains("4x4"), "{}", removed["broken-tiny"].1);
    assert!(ds.items.iter().all(|it| !it.id.starts_with("broken-")));

    // Exact duplicates: every labels.csv exact group keeps exactly its first member.
    let mut exact: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in &c.rows {
        if !r["exact_dup_group"].is_empty() {
            exact.entry(&r["exact_dup_group"]).or_default().push(&r["id"]);
        }
    }
    assert!(exact.len() >= 100, "the subset has {} exact groups", exact.len());
    let kept: HashMap<&str, &curate::Item> = ds.items.iter().map(|it| (it.id.as_str(), it)).collect();
    for (group, ids) in &exact {
        let present: Vec<&&str> = ids.iter().filter(|id| kept.contains_key(**id)).collect();
        assert_eq!(present.len(), 1, "exact group {group}: kept {present:?} of {ids:?}");
        for id in ids.iter().filter(|id| !kept.contains_key(**id)) {
            assert_eq!(removed[id].0, Reason::ExactDuplicate, "{id}");
            assert_eq!(removed[id].1, format!("same file content as {}", present[0]));
        }
    }

    // The same photo labelled Tshirts (1165) and Watches (5062): reported, and the kept copy's article type is made
    // missing rather than guessed.
    let conflict = outcome
        .conflicts
        .iter()
        .find(|k| k.kind == "exact" && k.group == "1165" && k.attribute == "articleType")
        .expect("articleType conflict of 1165/5062 reported");
    assert_eq!(
        conflict.values,
        [("Tshirts".to_string(), vec!["1165".to_string()]), ("Watches".into(), vec!["5062".into()])]
    );
    let article = ds.attribute("articleType").unwrap();
    assert_eq!(kept["1165"].labels[article], Label::Missing);
    let csv_text = std::fs::read_to_string(out.join("conflicts.csv")).unwrap();
    assert!(csv_text.contains("exact,1165,articleType,Watches,5062\n"), "{csv_text}");
    let removed_csv = std::fs::read_to_string(out.join("removed.csv")).unwrap();
    assert!(removed_csv.lines().any(|l| l.starts_with("broken-white,") && l.contains(",blank,")), "{removed_csv}");

    // Groups never span splits: neither curate's own groups nor the catalog's duplicate annotations.
    let mut by_group: HashMap<&str, BTreeSet<Split>> = HashMap::new();
    for it in &ds.items {
        by_group.entry(&it.group).or_default().insert(it.split);
    }
    assert!(by_group.values().all(|s| s.len() == 1));
    for column in ["near_dup_group", "exact_dup_group"] {
        let mut splits: HashMap<&str, BTreeSet<Split>> = HashMap::new();
        for r in c.rows.iter().filter(|r| !r[column].is_empty()) {
            if let Some(it) = kept.get(r["id"].as_str()) {
                splits.entry(&r[column]).or_default().insert(it.split);
            }
        }
        assert!(splits.len() >= 100);
        for (g, s) in &splits {
            assert_eq!(s.len(), 1, "{column} {g} spans {s:?}");
        }
    }
    let [tr, va, te] = outcome.summary.split_items;
    let n = ds.items.len() as f64;
    assert!((tr as f64 / n - 0.8).abs() < 0.02 && (va as f64 / n - 0.1).abs() < 0.02, "{tr}/{va}/{te}");

    // Labels went through the schema: merged colours, text-derived patterns only for topwear.
    let colour = &ds.attributes[ds.attribute("baseColour").unwrap()];
    assert!(colour.classes.contains(&"Blue".into()) && !colour.classes.contains(&"Navy Blue".into()));
    let pattern = ds.attribute("pattern").unwrap();
    let name: HashMap<&str, &str> =
        c.rows.iter().map(|r| (r["id"].as_str(), r["productDisplayName"].as_str())).collect();
    let pclasses = &ds.attributes[pattern].classes;
    for it in &ds.items {
        let at = &it.labels[article];
        let topwear = matches!(at, Label::Class(k) if ["Tshirts", "Shirts", "Tops"].contains(&ds.attributes[article].classes[*k as usize].as_str()));
        match &it.labels[pattern] {
            Label::Class(k) if pclasses[*k as usize] == "striped" => {
                assert!(name[it.id.as_str()].to_lowercase().contains("stripe"), "{}", name[it.id.as_str()])
            }
            Label::NotApplicable => assert!(!topwear, "{} is topwear but pattern n/a", it.id),
            _ => {}
        }
    }
    assert!(ds.items.iter().any(|it| it.labels[pattern] == Label::NotApplicable));
    assert!(ds.items.iter().any(|it| matches!(it.labels[pattern], Label::Class(_))));

    // The manifest loads back as it was written, and the plots are real PNGs.
    let back = Dataset::load(&out).unwrap();
    assert_eq!(back.items, ds.items);
    assert_eq!(back.attributes, ds.attributes);
    assert_eq!(back.fingerprint, ds.fingerprint);
    assert_eq!(back.items(Split::Test).count(), te);
    for attr in ["gender", "articleType", "baseColour", "season", "usage", "pattern", "removed"] {
        let png = out.join(format!("plots/{attr}.png"));
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Png);
        let img = image::load_from_memory(&bytes).unwrap();
        assert!(img.width() > 300 && img.height() > 150, "{attr}: {}x{}", img.width(), img.height());
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("![articleType](plots/articleType.png)"));
    assert!(report.contains(&format!("| blank | {} |", outcome.summary.removed[&Reason::Blank])));

    // Same inputs, same dataset: byte-identical manifest and fingerprint.
    let again = c.root().join("again");
    let second = curate::curate(&fashion_schema(), &options(&c, c.labels(), &again)).unwrap();
    assert_eq!(second.dataset.fingerprint, ds.fingerprint);
    assert_eq!(std::fs::read(again.join(MANIFEST_FILE)).unwrap(), std::fs::read(out.join(MANIFEST_FILE)).unwrap());
    // A different seed gives a different split and so a different fingerprint.
    let reseeded = Options { seed: Some(99), ..options(&c, c.labels(), &c.root().join("seed99")) };
    assert_ne!(curate::curate(&fashion_schema(), &reseeded).unwrap().dataset.fingerprint, ds.fingerprint);
}

#[test]
fn own_near_duplicate_detection_finds_the_catalogs_groups() {
    // Without the catalog's annotations as grouping columns, curate's perceptual grouping alone has to keep the
    // annotated near duplicates (mostly shade variants of one photo) together.
    let c = catalog();
    let mut schema = fashion_schema();
    schema.split.group_columns.clear();
    let out = c.root().join("out");
    let outcome = curate::curate(&schema, &options(&c, c.labels(), &out)).unwrap();
    let group: HashMap<&str, &str> =
        outcome.dataset.items.iter().map(|it| (it.id.as_str(), it.group.as_str())).collect();
    let mut near: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in &c.rows {
        if !r["near_dup_group"].is_empty() && group.contains_key(r["id"].as_str()) {
            near.entry(&r["near_dup_group"]).or_default().push(&r["id"]);
        }
    }
    let (mut pairs, mut together) = (0, 0);
    for ids in near.values() {
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                pairs += 1;
                together += usize::from(group[a] == group[b]);
            }
        }
    }
    assert!(pairs >= 100, "{pairs} annotated pairs");
    let recall = together as f64 / pairs as f64;
    assert!(recall >= 0.9, "near-duplicate recall {recall} ({together}/{pairs})");
    // And it does not lump unrelated products together: no group comes near the size of a product category.
    let mut sizes: HashMap<&str, usize> = HashMap::new();
    for g in group.values() {
        *sizes.entry(g).or_default() += 1;
    }
    let largest = sizes.values().max().unwrap();
    assert!(*largest <= 40, "largest group has {largest} items");
}

#[test]
fn adding_items_never_moves_existing_ones() {
    let c = catalog();
    let (_, all) = read_labels(&fashion_dir());
    let first_rows: Vec<Row> = c.rows.clone();
    let first = curate::curate(&fashion_schema(), &options(&c, c.labels(), &c.root().join("v1"))).unwrap();
    // Version 2 of the catalog: 600 new real rows interleaved by id, including near duplicates of existing items.
    let have: BTreeSet<&str> = first_rows.iter().map(|r| r["id"].as_str()).collect();
    let extra: Vec<Row> =
        all.iter().filter(|r| !have.contains(r["id"].as_str())).step_by(60).take(600).cloned().collect();
    assert_eq!(extra.len(), 600);
    let mut rows = first_rows.clone();
    rows.extend(extra);
    let labels2 = c.root().join("labels-v2.csv");
    write_csv(&labels2, &c.header, &rows);
    let opts = Options { previous: Some(c.root().join("v1")), ..options(&c, labels2, &c.root().join("v2")) };
    let second = curate::curate(&fashion_schema(), &opts).unwrap();
    let before: HashMap<&str, Split> = first.dataset.items.iter().map(|it| (it.id.as_str(), it.split)).collect();
    let mut moved = Vec::new();
    for it in &second.dataset.items {
        if let Some(s) = before.get(it.id.as_str()).filter(|s| **s != it.split) {
            moved.push((it.id.clone(), *s, it.split));
        }
    }
    assert!(moved.is_empty(), "{} items moved: {:?}", moved.len(), &moved[..moved.len().min(5)]);
    let now: HashMap<&str, Split> = second.dataset.items.iter().map(|it| (it.id.as_str(), it.split)).collect();
    let gone: Vec<&&str> = before.keys().filter(|id| !now.contains_key(**id)).collect();
    assert!(
        gone.is_empty(),
        "items of v1 missing from v2: {gone:?}; removed: {:?}",
        second.removed.iter().filter(|r| gone.contains(&&r.id.as_str())).collect::<Vec<_>>()
    );
    assert_eq!(second.summary.kept_splits, first.dataset.items.len());
    assert_eq!(second.dataset.split.previous.as_deref(), Some(first.dataset.fingerprint.as_str()));
    // Every new row is in, unless it is a copy of an image that was already there.
    let new_ids: Vec<&str> = rows[first_rows.len()..].iter().map(|r| r["id"].as_str()).collect();
    for id in &new_ids {
        let copy = second.removed.iter().any(|r| r.id == *id && r.reason == Reason::ExactDuplicate);
        assert!(now.contains_key(id) || copy, "new row {id} is missing");
    }
    assert!(new_ids.iter().filter(|id| now.contains_key(**id)).count() >= 590);
    // The new items are split in proportion too.
    let new_test = second
        .dataset
        .items
        .iter()
        .filter(|it| !before.contains_key(it.id.as_str()) && it.split == Split::Test)
        .count();
    assert!((30..=90).contains(&new_test), "{new_test} of 600 new items went to test");
}

#[test]
fn binary_prints_a_summary_and_keeps_splits_when_rerun() {
    let c = catalog();
    let out = c.root().join("cli");
    let run = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["curate", "--quiet", "--schema"])
            .arg(repo().join("config/fashion-schema.toml"))
            .arg("--labels")
            .arg(c.labels())
            .arg("--images")
            .arg(c.root())
            .arg("--out")
            .arg(&out)
            .args(extra)
            .env("TRAINER_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap())
    };
    let (stdout, _) = run(&[]);
    let ds = Dataset::load(&out).unwrap();
    assert!(stdout.contains(&format!("kept {} of {} records", ds.items.len(), c.rows.len())), "{stdout}");
    assert!(stdout.contains("blank 1,") && stdout.contains("truncated 1"), "{stdout}");
    assert!(stdout.contains(&format!("fingerprint: {}", ds.fingerprint)), "{stdout}");
    assert!(stdout.contains("report: ") && stdout.contains("report.md"), "{stdout}");
    // Re-running into the same directory keeps its splits; a new seed changes nothing then.
    let (stdout, stderr) = run(&["--seed", "7"]);
    assert!(stderr.contains("keeping the splits of the dataset already in"), "{stderr}");
    assert_eq!(
        Dataset::load(&out).unwrap().items.iter().map(|i| i.split).collect::<Vec<_>>(),
        ds.items.iter().map(|i| i.split).collect::<Vec<_>>()
    );
    assert!(stdout.contains(&format!("kept the previous split of {} items", ds.items.len())), "{stdout}");
    // --fresh-split re-splits with the new seed.
    run(&["--seed", "7", "--fresh-split"]);
    assert_ne!(Dataset::load(&out).unwrap().fingerprint, ds.fingerprint);
    // A schema error names the attribute and the key.
    let bad = c.root().join("bad.toml");
    std::fs::write(&bad, "[[attribute]]\nname = \"colour\"\nmerge = { Blue = [\"Teal\"], Green = [\"Teal\"] }\n")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["curate", "--schema"])
        .arg(&bad)
        .args(["--images", "/nonexistent", "--out", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("attribute \"colour\": merge.\"Green\": value \"Teal\" is also mapped by merge.\"Blue\""),
        "{err}"
    );
}

#[test]
fn jsonl_and_imagefolder_inputs() {
    let data = fashion_dir();
    let dir = tempfile::tempdir().unwrap();
    // ImageFolder: <class>/<image>, two classes of real photos plus an exact copy across classes.
    let tree = dir.path().join("tree");
    let photos = [("Tshirts", ["1163", "1164", "1165"]), ("Watches", ["1541", "1542", "5062"])];
    for (class, ids) in photos {
        std::fs::create_dir_all(tree.join(class)).unwrap();
        for id in ids {
            std::fs::copy(data.join(format!("images/{id}.jpg")), tree.join(class).join(format!("{id}.jpg"))).unwrap();
        }
    }
    let schema = Schema::from_toml("[[attribute]]\nname = \"type\"\ncolumn = \"class\"\n").unwrap();
    let opts = |labels: Option<PathBuf>, images: &Path, out: &str| Options {
        labels,
        images: images.to_path_buf(),
        out: dir.path().join(out),
        format: None,
        seed: None,
        previous: None,
        progress: false,
    };
    let o = curate::curate(&schema, &opts(None, &tree, "if")).unwrap();
    let ids: Vec<&str> = o.dataset.items.iter().map(|i| i.id.as_str()).collect();
    // 1165.jpg and 5062.jpg are the same file: the copy under Watches is dropped and the class conflict reported.
    assert_eq!(
        ids,
        ["Tshirts/1163.jpg", "Tshirts/1164.jpg", "Tshirts/1165.jpg", "Watches/1541.jpg", "Watches/1542.jpg"]
    );
    assert_eq!(o.dataset.attributes[0].classes, ["Tshirts", "Watches"]);
    assert_eq!(o.conflicts.len(), 1);
    assert_eq!(o.dataset.items[2].labels[0], Label::Missing);
    assert_eq!(o.dataset.items[0].labels[0], Label::Class(0));

    // JSONL with numbers as ids and a multi-label list.
    let jsonl = dir.path().join("labels.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\": 1163, \"image\": \"images/1163.jpg\", \"tags\": [\"jersey\", \"blue\"]}\n\
         {\"id\": 1525, \"image\": \"images/1525.jpg\", \"tags\": [\"bag\"]}\n\
         {\"id\": 1541, \"image\": \"images/1541.jpg\", \"tags\": null}\n",
    )
    .unwrap();
    let schema = Schema::from_toml("[[attribute]]\nname = \"tags\"\nkind = \"multi\"\n").unwrap();
    let o = curate::curate(&schema, &opts(Some(jsonl), &data, "jsonl")).unwrap();
    let labels: Vec<&Label> = o.dataset.items.iter().map(|i| &i.labels[0]).collect();
    assert_eq!(o.dataset.attributes[0].classes, ["bag", "blue", "jersey"]);
    assert_eq!(labels, [&Label::Multi(vec![1, 2]), &Label::Multi(vec![0]), &Label::Missing]);
}

/// The whole catalog, as the shipped default model is curated: about 25 s in a debug build on 2 idle cores.
#[test]
fn full_fashion_catalog() {
    let data = fashion_dir();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        labels: Some(data.join("labels.csv")),
        images: data.clone(),
        out: dir.path().to_path_buf(),
        format: None,
        seed: None,
        previous: None,
        progress: false,
    };
    let o = curate::curate(&fashion_schema(), &opts).unwrap();
    let s = &o.summary;
    assert_eq!(s.records, 39_687);
    // The catalog's one blank image and its byte-identical copies (README: about 1,300 files in about 600 groups).
    assert_eq!(s.removed.get(&Reason::Blank), Some(&1));
    let copies = s.removed[&Reason::ExactDuplicate];
    assert!((600..=800).contains(&copies), "{copies} exact copies removed");
    assert_eq!(s.removed.values().sum::<usize>(), 1 + copies, "{:?}", s.removed);
    assert!(s.exact_conflicts > 20, "{} exact conflicts", s.exact_conflicts);
    let n = s.kept as f64;
    for (split, want) in s.split_items.iter().zip([0.8, 0.1, 0.1]) {
        assert!((*split as f64 / n - want).abs() < 0.005, "{:?}", s.split_items);
    }
    // Stratified by article type: every type with at least 100 items gets each split's share to within one of its
    // groups (lipstick shades come in near-duplicate groups of up to about 20) plus one item.
    let ds = &o.dataset;
    let article = ds.attribute("articleType").unwrap();
    let mut group_sizes: HashMap<&str, usize> = HashMap::new();
    for it in &ds.items {
        *group_sizes.entry(&it.group).or_default() += 1;
    }
    let mut largest = vec![1usize; ds.attributes[article].classes.len()];
    for it in &ds.items {
        if let Label::Class(k) = it.labels[article] {
            largest[k as usize] = largest[k as usize].max(group_sizes[it.group.as_str()]);
        }
    }
    let per: Vec<_> = Split::ALL.iter().map(|sp| ds.counts(article, Some(*sp))).collect();
    let mut checked = 0;
    for (k, class) in ds.attributes[article].classes.iter().enumerate() {
        let total: usize = per.iter().map(|c| c.classes[k]).sum();
        if total >= 100 {
            checked += 1;
            for (sp, want) in [0.8, 0.1, 0.1].iter().enumerate() {
                let got = per[sp].classes[k] as f64;
                let slack = (largest[k] + 1) as f64;
                assert!((got - want * total as f64).abs() <= slack, "{class}: split {sp} has {got} of {total}");
            }
        }
    }
    assert!(checked >= 40, "{checked} article types checked");
    let colour = &ds.attributes[ds.attribute("baseColour").unwrap()];
    assert_eq!(colour.classes.len(), 15, "{:?}", colour.classes);
    assert!(Dataset::load(dir.path()).is_ok());
}
