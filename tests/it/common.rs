//! Paths and helpers shared by the integration tests.

use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `models/imagenet-lite0`, built by `./scripts/setup` from the real pretrained weights.
pub fn imagenet_bundle() -> PathBuf {
    let p = repo().join("models/imagenet-lite0");
    assert!(p.join("manifest.json").is_file(), "{} missing: run ./scripts/setup first", p.display());
    p
}

/// The real labelled product photos (`../shared/data/fashion`, or `ATTRD_DATA_DIR`).
pub fn fashion() -> PathBuf {
    let p =
        std::env::var_os("ATTRD_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared/data/fashion"));
    assert!(p.join("labels.csv").is_file(), "{} has no labels.csv (set ATTRD_DATA_DIR)", p.display());
    p
}

/// Rows of `labels.csv` as (id, file, articleType), in file order.
pub fn fashion_rows() -> Vec<(String, PathBuf, String)> {
    let dir = fashion();
    let text = std::fs::read_to_string(dir.join("labels.csv")).expect("labels.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let (id, file, art) = (col("id"), col("file"), col("articleType"));
    lines
        .filter_map(|l| {
            // productDisplayName may contain quoted commas, but the columns we read come before it.
            let f: Vec<&str> = l.split(',').collect();
            (f.len() > art).then(|| (f[id].to_string(), dir.join(f[file]), f[art].to_string()))
        })
        .collect()
}

/// Copies a bundle directory so a test can tamper with it.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}
