//! The ML engineer's path through the real `trainer` binary on a small slice of the real catalogue: curate → train
//! (2 epochs, 64×64, from the ImageNet Lite0 weights) → eval → audit with planted flips. The loss must fall and each
//! step must leave its artefacts.

use crate::common::{fashion_dir, lite0_checkpoint};

use std::path::Path;
use std::process::Command;

fn trainer(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).current_dir(cwd).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "trainer {args:?} failed:\n{err}");
    err
}

const SCHEMA: &str = r#"
[source]
id_column = "id"
image_column = "file"
[duplicates]
near = false
[split]
seed = 3
train = 0.7
val = 0.15
test = 0.15
group_by = "exact"
stratify = "masterCategory"
[[attribute]]
name = "masterCategory"
min_count = 10
[[attribute]]
name = "gender"
min_count = 10
"#;

const TRAIN: &str = r#"
arch = "efficientnet-lite0"
epochs = 2
batch_size = 32
lr = 0.003
warmup_epochs = 0.3
device = "cpu"
early_stopping_patience = 0
[input]
width = 64
height = 64
"#;

#[test]
fn curate_train_eval_and_audit_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let data = fashion_dir();
    // The first 600 catalogue rows, as a labels file of their own.
    let text = std::fs::read_to_string(data.join("labels.csv")).unwrap();
    let head: Vec<&str> = text.lines().take(601).collect();
    std::fs::write(w.join("labels.csv"), head.join("\n") + "\n").unwrap();
    std::fs::write(w.join("schema.toml"), SCHEMA).unwrap();
    std::fs::write(w.join("train.toml"), TRAIN).unwrap();
    let data_s = data.to_str().unwrap();

    let out = trainer(
        &["curate", "--schema", "schema.toml", "--labels", "labels.csv", "--images", data_s, "--out", "ds", "--quiet"],
        w,
    );
    assert!(w.join("ds/dataset.json").is_file(), "{out}");
    let lite0 = lite0_checkpoint();
    trainer(&["import-weights", lite0.to_str().unwrap(), "-o", "lite0.safetensors"], w);
    let out = trainer(
        &["train", "--dataset", "ds", "--config", "train.toml", "--init", "lite0.safetensors", "--out", "run"],
        w,
    );
    assert!(out.contains("best validation mean macro-F1"), "{out}");
    let csv = std::fs::read_to_string(w.join("run/metrics.csv")).unwrap();
    let losses: Vec<f64> = csv.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), 2, "{csv}");
    assert!(losses[1] < losses[0], "the training loss must fall: {losses:?}");
    for f in ["best.safetensors", "last.safetensors", "run.json", "loss.png", "val_f1.png"] {
        assert!(w.join("run").join(f).is_file(), "{f} missing");
    }

    let out = trainer(&["eval", "--run", "run", "--dataset", "ds", "--out", "eval", "--device", "cpu"], w);
    assert!(out.contains("masterCategory") && out.contains("gender"), "{out}");
    let html = std::fs::read_to_string(w.join("eval/report.html")).unwrap();
    assert!(html.contains("masterCategory") && html.contains("data:image/png;base64,"));
    let cal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.join("eval/calibration.json")).unwrap()).unwrap();
    assert!(cal.to_string().contains("temperature"), "{cal}");

    let out = trainer(
        &[
            "audit",
            "--dataset",
            "ds",
            "--init",
            "lite0.safetensors",
            "--config",
            "train.toml",
            "--folds",
            "3",
            "--flip-rate",
            "0.05",
            "--device",
            "cpu",
            "--out",
            "audit",
        ],
        w,
    );
    assert!(out.contains("planted flips: precision"), "{out}");
    let issues = std::fs::read_to_string(w.join("audit/label_issues.csv")).unwrap();
    assert!(issues.starts_with("rank,head,id,image,given,suggested"), "{issues}");
    assert!(issues.lines().count() > 1, "some candidates are ranked");
    let audit: serde_json::Value = serde_json::from_slice(&std::fs::read(w.join("audit/audit.json")).unwrap()).unwrap();
    let recall = audit["heads"][0]["planted"]["recall"].as_f64().unwrap();
    assert!(recall > 0.3, "the audit finds a good part of the planted flips: {audit}");
}
