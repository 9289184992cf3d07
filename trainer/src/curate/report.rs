//! The human side of a curated dataset: `report.md`, `removed.csv`, `conflicts.csv` and `plots/*.png`.

use super::dataset::{Dataset, Split};
use super::import::Format;
use super::{Conflict, CurateError, Removed, Summary};
use crate::plot::{self, BarChart};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub(crate) const REPORT_FILE: &str = "report.md";
pub(crate) const REMOVED_FILE: &str = "removed.csv";
pub(crate) const CONFLICTS_FILE: &str = "conflicts.csv";
const PLOTS_DIR: &str = "plots";
/// Conflict rows shown in the report itself; the CSV has all of them.
const REPORT_CONFLICT_ROWS: usize = 30;

/// Rare values of one attribute: (value, examples, folded into `other`?).
pub(crate) type RareValues = Vec<(String, usize, bool)>;

/// Facts from the run that the dataset itself does not hold.
pub(crate) struct Notes {
    /// Per attribute: its rare values.
    pub rare: Vec<(String, RareValues)>,
    /// Per attribute: `applies_when` values that are not classes of the parent.
    pub unknown_condition_values: Vec<(String, Vec<String>)>,
    pub format: Format,
    pub labels: Option<PathBuf>,
}

fn csv_err(path: &Path) -> impl FnOnce(csv::Error) -> CurateError + '_ {
    move |source| CurateError::WriteCsv { path: path.to_path_buf(), source }
}

/// Writes `removed.csv`: id, line, image, reason, detail.
pub(crate) fn write_removed(out: &Path, removed: &[Removed]) -> Result<PathBuf, CurateError> {
    std::fs::create_dir_all(out).map_err(|source| CurateError::Write { path: out.to_path_buf(), source })?;
    let path = out.join(REMOVED_FILE);
    let mut w = csv::Writer::from_path(&path).map_err(csv_err(&path))?;
    w.write_record(["id", "line", "image", "reason", "detail"]).map_err(csv_err(&path))?;
    for r in removed {
        w.write_record([r.id.as_str(), &r.line.to_string(), &r.image, r.reason.name(), &r.detail])
            .map_err(csv_err(&path))?;
    }
    w.flush().map_err(|source| CurateError::Write { path: path.clone(), source })?;
    Ok(path)
}

/// Writes `conflicts.csv`: one row per (group, attribute, value) with the ids carrying that value.
fn write_conflicts(out: &Path, conflicts: &[Conflict]) -> Result<PathBuf, CurateError> {
    let path = out.join(CONFLICTS_FILE);
    let mut w = csv::Writer::from_path(&path).map_err(csv_err(&path))?;
    w.write_record(["kind", "group", "attribute", "value", "ids"]).map_err(csv_err(&path))?;
    for c in conflicts {
        for (value, ids) in &c.values {
            w.write_record([c.kind, &c.group, &c.attribute, value, &ids.join(" ")]).map_err(csv_err(&path))?;
        }
    }
    w.flush().map_err(|source| CurateError::Write { path: path.clone(), source })?;
    Ok(path)
}

/// A file name for `name`: letters, digits, `-` and `_` kept, anything else `_`; made unique within `used`.
fn file_stem(name: &str, used: &mut HashSet<String>) -> String {
    let base: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let mut stem = base.clone();
    let mut k = 2;
    while !used.insert(stem.clone()) {
        stem = format!("{base}-{k}");
        k += 1;
    }
    stem
}

fn pct(part: usize, whole: usize) -> String {
    if whole == 0 { "–".into() } else { format!("{:.1} %", 100.0 * part as f64 / whole as f64) }
}

/// Markdown table cell: pipes and newlines would break the table.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub(crate) fn write_all(
    out: &Path,
    ds: &Dataset,
    removed: &[Removed],
    conflicts: &[Conflict],
    summary: &Summary,
    notes: &Notes,
) -> Result<(), CurateError> {
    write_removed(out, removed)?;
    write_conflicts(out, conflicts)?;
    let plots = out.join(PLOTS_DIR);
    std::fs::create_dir_all(&plots).map_err(|source| CurateError::Write { path: plots.clone(), source })?;
    let mut used = HashSet::new();
    let mut md = String::new();
    // Writing into a String cannot fail; the `let _` keeps that obvious instead of unwrapping each line.
    let _ = writeln!(md, "# Dataset report\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| fingerprint | `{}` |", ds.fingerprint);
    let input = match &notes.labels {
        Some(p) => format!("`{}` ({:?})", p.display(), notes.format),
        None => format!("{:?}", notes.format),
    };
    let _ = writeln!(md, "| input | {input} |");
    let _ = writeln!(md, "| image root | `{}` |", ds.image_root.display());
    let _ = writeln!(md, "| records read | {} |", summary.records);
    let removed_n: usize = summary.removed.values().sum();
    let _ = writeln!(md, "| kept | {} ({}) |", summary.kept, pct(summary.kept, summary.records));
    let _ = writeln!(md, "| removed | {removed_n} ({}) |", pct(removed_n, summary.records));
    let _ = writeln!(md, "| curation time | {:.1} s |\n", summary.seconds);

    // Removed.
    let _ = writeln!(md, "## Removed items\n");
    if removed.is_empty() {
        let _ = writeln!(md, "None.\n");
    } else {
        let _ = writeln!(md, "All of them, with details, are in [`{REMOVED_FILE}`]({REMOVED_FILE}).\n");
        let _ = writeln!(md, "| reason | items | examples |\n|---|---:|---|");
        let mut examples: BTreeMap<super::Reason, Vec<&str>> = BTreeMap::new();
        for r in removed {
            let e = examples.entry(r.reason).or_default();
            if e.len() < 5 {
                e.push(if r.id.is_empty() { "(no id)" } else { r.id.as_str() });
            }
        }
        for (reason, n) in &summary.removed {
            let ex = examples.get(reason).map(|e| e.join(", ")).unwrap_or_default();
            let _ = writeln!(md, "| {reason} | {n} | {} |", cell(&ex));
        }
        let chart = BarChart {
            title: "Removed items by reason".into(),
            value_label: "items".into(),
            labels: summary.removed.keys().map(|r| r.name().to_string()).collect(),
            series: vec![("removed".into(), summary.removed.values().map(|n| *n as f64).collect())],
        };
        let stem = file_stem("removed", &mut used);
        plot::bar_chart(&chart, &plots.join(format!("{stem}.png")))?;
        let _ = writeln!(md, "\n![removed items]({PLOTS_DIR}/{stem}.png)\n");
    }

    // Splits.
    let _ = writeln!(md, "## Splits\n");
    let s = &ds.split;
    let _ = writeln!(
        md,
        "Seed {}, targets train {} / val {} / test {}, grouped by {}{}{}; {} groups, {} items share a group with others.{}\n",
        s.seed,
        s.train,
        s.val,
        s.test,
        s.group_by.as_str(),
        if s.group_columns.is_empty() {
            String::new()
        } else {
            format!(" and the columns {}", s.group_columns.join(", "))
        },
        s.stratify.as_ref().map(|a| format!(", stratified by {a}")).unwrap_or_default(),
        summary.groups,
        summary.grouped_items,
        s.previous
            .as_ref()
            .map(|p| format!(" Splits of {} items kept from the previous dataset `{p}`.", summary.kept_splits))
            .unwrap_or_default(),
    );
    if summary.spanning_groups > 0 {
        let _ = writeln!(
            md,
            "**{} groups span splits**: new items joined items that the previous dataset had put in different splits; \
             the old items kept their splits and the new ones went to the most held-out of them.\n",
            summary.spanning_groups
        );
    }
    let _ = writeln!(md, "| split | items | share |\n|---|---:|---:|");
    for split in Split::ALL {
        let n = summary.split_items[split.index()];
        let _ = writeln!(md, "| {split} | {n} | {} |", pct(n, summary.kept));
    }
    let _ = writeln!(md);

    // Attributes.
    let _ = writeln!(md, "## Attributes\n");
    for (a, attr) in ds.attributes.iter().enumerate() {
        let all = ds.counts(a, None);
        let per: Vec<_> = Split::ALL.iter().map(|s| ds.counts(a, Some(*s))).collect();
        let _ = writeln!(md, "### {}\n", attr.name);
        let cond = attr.applies_to.as_ref().map(|c| {
            let on = c.attribute.as_deref().or(c.column.as_deref()).unwrap_or("?");
            format!(", applies when {on} is one of {}", c.values.join(", "))
        });
        let _ = writeln!(
            md,
            "{}-label, {} classes{}. Missing: {} ({}); not applicable: {} ({}).\n",
            attr.kind.as_str(),
            attr.classes.len(),
            cond.unwrap_or_default(),
            all.missing,
            pct(all.missing, all.items),
            all.not_applicable,
            pct(all.not_applicable, all.items),
        );
        if let Some((_, values)) = notes.unknown_condition_values.iter().find(|(n, _)| *n == attr.name) {
            let _ = writeln!(
                md,
                "Condition values that are not classes of the parent (items with them count as not applicable): {}.\n",
                values.join(", ")
            );
        }
        if let Some((_, rare)) = notes.rare.iter().find(|(n, _)| *n == attr.name).filter(|(_, r)| !r.is_empty()) {
            let (folded, dropped): (Vec<_>, Vec<_>) = rare.iter().partition(|(_, _, f)| *f);
            let list = |v: &[&(String, usize, bool)]| {
                v.iter().map(|(v, n, _)| format!("{v} ({n})")).collect::<Vec<_>>().join(", ")
            };
            if !dropped.is_empty() {
                let _ = writeln!(md, "Rare values dropped (label missing): {}.\n", cell(&list(&dropped)));
            }
            if !folded.is_empty() {
                let _ = writeln!(md, "Rare values folded into the last class: {}.\n", cell(&list(&folded)));
            }
        }
        if attr.classes.is_empty() {
            let _ = writeln!(md, "**No class has enough examples**; this attribute cannot be trained.\n");
            continue;
        }
        let stem = file_stem(&attr.name, &mut used);
        let chart = BarChart {
            title: format!("{}: examples per class and split", attr.name),
            value_label: "items".into(),
            labels: attr.classes.clone(),
            series: Split::ALL
                .iter()
                .map(|s| (s.name().to_string(), per[s.index()].classes.iter().map(|n| *n as f64).collect()))
                .collect(),
        };
        plot::bar_chart(&chart, &plots.join(format!("{stem}.png")))?;
        let _ = writeln!(md, "![{}]({PLOTS_DIR}/{stem}.png)\n", attr.name);
        let _ = writeln!(md, "| class | train | val | test | total |\n|---|---:|---:|---:|---:|");
        for (k, class) in attr.classes.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                cell(class),
                per[0].classes[k],
                per[1].classes[k],
                per[2].classes[k],
                all.classes[k]
            );
        }
        let _ = writeln!(
            md,
            "| *missing* | {} | {} | {} | {} |\n| *not applicable* | {} | {} | {} | {} |\n",
            per[0].missing,
            per[1].missing,
            per[2].missing,
            all.missing,
            per[0].not_applicable,
            per[1].not_applicable,
            per[2].not_applicable,
            all.not_applicable
        );
    }

    // Conflicts.
    let _ = writeln!(md, "## Label conflicts in duplicate groups\n");
    if conflicts.is_empty() {
        let _ = writeln!(md, "None.\n");
    } else {
        let _ = writeln!(
            md,
            "{} among exact copies (identical files with different labels; the disagreeing attribute is made missing \
             unless `duplicates.exact_conflicts = \"keep\"`), {} in near-duplicate groups (often legitimate: shade \
             variants of one photo differ in colour). All rows: [`{CONFLICTS_FILE}`]({CONFLICTS_FILE}).\n",
            summary.exact_conflicts, summary.near_conflicts
        );
        let mut by_attr: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for c in conflicts {
            *by_attr.entry((c.kind, c.attribute.as_str())).or_default() += 1;
        }
        let _ = writeln!(md, "| kind | attribute | groups |\n|---|---|---:|");
        for ((kind, attr), n) in &by_attr {
            let _ = writeln!(md, "| {kind} | {} | {n} |", cell(attr));
        }
        let _ = writeln!(md, "\n| kind | group | attribute | values (ids) |\n|---|---|---|---|");
        for c in conflicts.iter().take(REPORT_CONFLICT_ROWS) {
            let values: Vec<String> = c.values.iter().map(|(v, ids)| format!("{v} ({})", ids.join(" "))).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                c.kind,
                cell(&c.group),
                cell(&c.attribute),
                cell(&values.join("; "))
            );
        }
        if conflicts.len() > REPORT_CONFLICT_ROWS {
            let _ = writeln!(
                md,
                "\n… and {} more in [`{CONFLICTS_FILE}`]({CONFLICTS_FILE}).",
                conflicts.len() - REPORT_CONFLICT_ROWS
            );
        }
    }
    let path = out.join(REPORT_FILE);
    std::fs::write(&path, md).map_err(|source| CurateError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stems_are_safe_and_unique() {
        let mut used = HashSet::new();
        assert_eq!(file_stem("baseColour", &mut used), "baseColour");
        assert_eq!(file_stem("a b/c", &mut used), "a_b_c");
        assert_eq!(file_stem("a_b_c", &mut used), "a_b_c-2");
        assert_eq!(file_stem("../x", &mut used), "___x");
    }
}
