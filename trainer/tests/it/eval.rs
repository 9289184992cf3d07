//! `trainer eval` end to end on real catalogue photos: curate a small slice of the fashion catalog, fine-tune the
//! real ImageNet Lite0 weights for one epoch at 64×64, evaluate, and check the report against numbers recomputed
//! here from the model's own logits.

use crate::common::{fashion_dir, lite0_checkpoint};

use std::path::Path;
use trainer::curate::{self, Dataset, Label, Split};
use trainer::torch::fit::{self, FitInput};
use trainer::torch::report::{self, Calibration, EvalOptions, EvalReport};
use trainer::train::{self, TrainConfig, data};
use trainer::weights::{self, ImportOptions};

/// Two single-label heads from columns and one multi-label head derived from the product names.
const SCHEMA: &str = r#"
[source]
id_column = "id"
image_column = "file"

[duplicates]
near = false

[split]
seed = 1
train = 0.6
val = 0.2
test = 0.2
group_by = "exact"
stratify = "masterCategory"

[[attribute]]
name = "masterCategory"
min_count = 5

[[attribute]]
name = "gender"
min_count = 5

[[attribute]]
name = "nameWords"
kind = "multi"
[attribute.derive]
from = ["productDisplayName"]
rules = [
    { value = "men", pattern = '\bmen\b' },
    { value = "women", pattern = '\bwomen\b' },
    { value = "black", pattern = '\bblack\b' },
    { value = "blue", pattern = '\bblue\b' },
    { value = "white", pattern = '\bwhite\b' },
]
"#;

/// Curates the first `n` catalogue rows into `out` (through the library `trainer curate` uses).
fn curate_slice(n: usize, work: &Path) -> Dataset {
    let fashion = fashion_dir();
    let text = std::fs::read_to_string(fashion.join("labels.csv")).unwrap();
    let slice: Vec<&str> = text.lines().take(n + 1).collect();
    let labels = work.join("labels.csv");
    std::fs::write(&labels, slice.join("\n") + "\n").unwrap();
    let schema = curate::Schema::from_toml(SCHEMA).unwrap();
    let out = work.join("dataset");
    let opts = curate::Options {
        labels: Some(labels),
        images: fashion,
        out: out.clone(),
        format: None,
        seed: None,
        previous: None,
        progress: false,
    };
    curate::curate(&schema, &opts).unwrap();
    Dataset::load(&out).unwrap()
}

fn config() -> TrainConfig {
    toml::from_str(
        r#"
        epochs = 1
        batch_size = 32
        lr = 0.003
        warmup_epochs = 0.25
        device = "cpu"
        repeat_factor_threshold = 0.0
        early_stopping_patience = 0
        [input]
        width = 64
        height = 64
        "#,
    )
    .unwrap()
}

#[test]
fn eval_reports_calibration_metrics_plots_and_gradcam_of_a_real_run() {
    let work = tempfile::tempdir().unwrap();
    let ds = curate_slice(320, work.path());
    let heads = train::heads_of(&ds);
    assert_eq!(heads.iter().map(|h| h.multi_label).collect::<Vec<_>>(), vec![false, false, true]);

    // A one-epoch fine-tune from the real Lite0 weights.
    let lite0 = lite0_checkpoint();
    let (backbone, _) = weights::import(&lite0, &ImportOptions::default()).unwrap();
    let cfg = config();
    let pre = data::preprocessor(cfg.input_spec()).unwrap();
    let load = |split: Split| {
        let (examples, failed) = data::load_examples(train::items_of(&ds, split, None), &pre, |_| {});
        assert!(failed.is_empty(), "{failed:?}");
        examples
    };
    let (train_set, val_set, test_set) = (load(Split::Train), load(Split::Val), load(Split::Test));
    assert!(test_set.len() >= 40 && val_set.len() >= 40, "val {} test {}", val_set.len(), test_set.len());
    let run_dir = work.path().join("run");
    fit::fit(FitInput {
        cfg: &cfg,
        heads: &heads,
        train: &train_set,
        val: &val_set,
        out_dir: &run_dir,
        resume: false,
        backbone: Some(&backbone),
        dataset_fingerprint: Some(ds.fingerprint.clone()),
        progress: false,
    })
    .unwrap();

    let out = work.path().join("eval");
    let opts = EvalOptions { device: "cpu".into(), ..EvalOptions::default() };
    let summary = report::evaluate(&run_dir, &ds, &opts, &out).unwrap();
    assert!(summary.report.warnings.is_empty(), "{:?}", summary.report.warnings);
    assert_eq!((summary.report.items, summary.report.calibration_items), (test_set.len(), val_set.len()));

    // eval.json parses (as JSON and back into the report type).
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(report::EVAL_FILE)).unwrap()).unwrap();
    let parsed: EvalReport = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(parsed.heads.len(), heads.len());
    assert_eq!(json["dataset"]["fingerprint"], ds.fingerprint.as_str());

    // Accuracy recomputed from the model's own logits on the test split.
    let (_, _vs, model) = fit::load_run(&run_dir, tch::Device::Cpu).unwrap();
    let logits = fit::predict_logits(&model, &test_set, &heads, &pre, tch::Device::Cpu, 64, false, false).unwrap();
    for (h, head) in heads.iter().enumerate().filter(|(_, h)| !h.multi_label) {
        let (mut right, mut labelled) = (0usize, 0usize);
        for (i, ex) in test_set.iter().enumerate() {
            let Some(y) = ex.targets[h].class() else { continue };
            let row = logits[h].row(i);
            let best = (0..row.len()).fold(0, |b, c| if row[c] > row[b] { c } else { b });
            labelled += 1;
            right += usize::from(best == y);
        }
        let expected = right as f64 / labelled as f64;
        let got = json["heads"][h]["summary"]["accuracy"].as_f64().unwrap();
        assert!((got - expected).abs() < 1e-12, "{}: accuracy {got} in eval.json, recomputed {expected}", head.name);

        // The confusion matrix counts every labelled test item of the dataset exactly once.
        let from_dataset = ds.items(Split::Test).filter(|it| matches!(it.labels[h], Label::Class(_))).count();
        assert_eq!(labelled, from_dataset);
        let confusion = &parsed.heads[h].single_label.as_ref().unwrap().report.confusion;
        assert_eq!(confusion.len(), head.classes.len());
        assert_eq!(confusion.iter().flatten().sum::<u64>(), from_dataset as u64, "{}", head.name);
        let s = &parsed.heads[h].summary;
        let ks: Vec<usize> = s.top_k.iter().map(|t| t.k).collect();
        assert_eq!(ks, [1, 3, 5].into_iter().filter(|&k| k <= head.classes.len()).collect::<Vec<_>>());
        assert!((s.top_k[0].accuracy - expected).abs() < 1e-12);
        assert!(s.ece_before.unwrap().is_finite() && s.ece_after.unwrap().is_finite());
        assert!((0.0..=1.0).contains(&s.coverage.unwrap()));
    }
    // The multi-label head is measured per class at its thresholds.
    let multi = parsed.heads[2].multi_label_metrics.as_ref().unwrap();
    assert_eq!(multi.at_thresholds.per_class.len(), heads[2].classes.len());

    // Both kinds of head count what they evaluated the same way, and name their always-abstaining classes.
    for e in &parsed.heads {
        assert_eq!(e.summary.evaluated, e.labels.labelled, "{}", e.name);
        let abstaining = e.thresholds.classes.iter().filter(|c| c.always_abstain).count();
        let prefix = format!("{abstaining} of {} classes never reach precision", e.classes.len());
        assert_eq!(e.notes.iter().any(|n| n.starts_with(&prefix)), abstaining > 0, "{}: {:?}", e.name, e.notes);
    }

    // calibration.json: a finite positive temperature and one threshold in [0, 1] per class, for every head.
    let cal: Calibration = serde_json::from_slice(&std::fs::read(out.join(report::CALIBRATION_FILE)).unwrap()).unwrap();
    assert_eq!(
        cal.heads.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        vec!["masterCategory", "gender", "nameWords"]
    );
    for (c, head) in cal.heads.iter().zip(&heads) {
        assert!(c.temperature.is_finite() && c.temperature > 0.0, "{}: T = {}", c.name, c.temperature);
        assert_eq!(c.classes, head.classes);
        assert_eq!(c.thresholds.len(), head.classes.len());
        assert_eq!(c.always_abstain.len(), head.classes.len());
        assert!(c.thresholds.iter().all(|t| (0.0..=1.0).contains(t)), "{}: {:?}", c.name, c.thresholds);
    }

    // Plots and Grad-CAM grids decode; every single-label head has a confusion matrix and a grid.
    for (h, e) in parsed.heads.iter().enumerate() {
        if !e.multi_label {
            assert!(e.plots.confusion.is_some() && e.plots.gradcam.is_some(), "{}: {:?}", e.name, e.plots);
            let n = e.gradcam.len();
            assert!((1..=8).contains(&n), "{}: {n} Grad-CAM samples", e.name);
        }
        assert!(e.plots.reliability.is_some(), "{}", e.name);
        for rel in [&e.plots.confusion, &e.plots.reliability, &e.plots.gradcam].into_iter().flatten() {
            let img = image::open(out.join(rel)).unwrap_or_else(|err| panic!("{rel}: {err}"));
            assert!(img.width() > 100 && img.height() > 100, "{rel}: {}x{}", img.width(), img.height());
        }
        if let Some(g) = &e.plots.gradcam {
            assert!(g.starts_with("gradcam/"), "head {h}: {g}");
        }
    }

    // report.html is self-contained: every image is a data URI, and every head is named.
    let html = std::fs::read_to_string(out.join(report::REPORT_FILE)).unwrap();
    assert!(html.contains("data:image/png;base64,"));
    for head in &heads {
        assert!(html.contains(&head.name), "{} missing from the report", head.name);
    }
    assert_eq!(html.matches("src=\"").count(), html.matches("src=\"data:image/png;base64,").count());
    assert!(html.contains(&ds.fingerprint));
    let table = report::summary_table(&summary.report);
    assert_eq!(table.lines().count(), 1 + heads.len());
}
