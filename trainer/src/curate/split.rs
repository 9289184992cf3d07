//! Grouped, stratified, reproducible train/val/test assignment.
//!
//! **Groups.** Items that must not be separated (duplicates, equal grouping-column values) form a group; a group's
//! key is its smallest item id (byte order). Splits are assigned to whole groups.
//!
//! **Order.** Each group gets `u = first 8 bytes of SHA-256(seed as 8 little-endian bytes ‖ group key)`: a keyed
//! hash, so the order is a pseudo-random shuffle fixed by the seed, independent of input order and platform.
//!
//! **Stratification.** Groups are stratified by a class of the `stratify` attribute (the label of the group's first
//! member that has one; groups without a label form their own stratum). Within each stratum, groups are taken in
//! `u` order and each goes to the split that is furthest *below* its target share of the stratum's items:
//! `argmax_s f_s·(n + size) − n_s`, where `n_s` items of the stratum are already in split `s` and `n` in total
//! (ties: train, then val, then test). Consequences, tested below:
//! - every class's items are split in the configured proportions up to about one group's size;
//! - a class's first groups go to train (with 0.8/0.1/0.1: the first 3 single-item groups; val gets the 4th, test
//!   the 10th), so a rare class is never held out while it has no training example.
//!
//! **Stability.** An existing item never changes split because items were added, given the previous dataset
//! (`--previous`, or the dataset already in the output directory): items found there keep their split, a group
//! holding such items goes where they are (to the most held-out of their splits if a new item bridged groups
//! from different splits; such groups are reported), and their counts seed the per-stratum balances, so new groups
//! fill whatever the stratum lacks. Without a previous dataset the assignment is a pure function of the seed and the
//! data: deterministic, but a new group can shift later groups of its stratum.

use super::dataset::Split;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// One group to place.
#[derive(Debug, Clone)]
pub(crate) struct GroupInput {
    /// The group key (smallest member id).
    pub key: String,
    /// Number of items.
    pub size: usize,
    /// Stratum (class index of the stratify attribute), `None` = unlabelled.
    pub stratum: Option<u32>,
    /// Splits some members had in the previous dataset.
    pub pinned: Vec<Split>,
}

/// The keyed hash that orders groups.
pub(crate) fn group_hash(seed: u64, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    // Invariant: a SHA-256 digest is 32 bytes.
    u64::from_be_bytes(d[..8].try_into().expect("digest has 8 bytes"))
}

/// Assigns a split to every group; `fractions` is (train, val, test) and sums to 1.
pub(crate) fn assign(groups: &[GroupInput], seed: u64, fractions: [f64; 3]) -> Vec<Split> {
    let mut out = vec![Split::Train; groups.len()];
    let mut strata: BTreeMap<Option<u32>, (Vec<usize>, [f64; 3])> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        let entry = strata.entry(g.stratum).or_default();
        // The most held-out split wins: moving a group's new items into training could leak test images.
        if let Some(s) = g.pinned.iter().max() {
            out[i] = *s;
            entry.1[s.index()] += g.size as f64;
        } else {
            entry.0.push(i);
        }
    }
    for (_, (mut free, mut counts)) in strata {
        free.sort_by_cached_key(|&i| (group_hash(seed, &groups[i].key), groups[i].key.clone()));
        for i in free {
            let size = groups[i].size as f64;
            let total: f64 = counts.iter().sum::<f64>() + size;
            let mut best = 0;
            let mut best_deficit = f64::NEG_INFINITY;
            for s in 0..3 {
                let deficit = fractions[s] * total - counts[s];
                // Strictly greater, so ties go to the earlier split (train before val before test).
                if deficit > best_deficit + 1e-9 {
                    best = s;
                    best_deficit = deficit;
                }
            }
            counts[best] += size;
            out[i] = Split::ALL[best];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: [f64; 3] = [0.8, 0.1, 0.1];

    fn groups(n: usize, strata: u32, prefix: &str) -> Vec<GroupInput> {
        (0..n)
            .map(|i| GroupInput {
                key: format!("{prefix}{i:05}"),
                size: 1 + (i * 7919) % 3,
                stratum: Some((i as u32).wrapping_mul(2654435761) % strata),
                pinned: vec![],
            })
            .collect()
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let g = groups(500, 5, "g");
        let a = assign(&g, 7, F);
        assert_eq!(a, assign(&g, 7, F));
        assert_ne!(a, assign(&g, 8, F));
        // Input order does not matter.
        let mut rev = g.clone();
        rev.reverse();
        let mut b = assign(&rev, 7, F);
        b.reverse();
        assert_eq!(a, b);
    }

    #[test]
    fn stratified_within_one_group_per_class() {
        let g = groups(3000, 6, "g");
        let a = assign(&g, 1, F);
        let max_group = g.iter().map(|g| g.size).max().unwrap() as f64;
        for stratum in 0..6 {
            let mut n = [0.0; 3];
            for (gi, s) in g.iter().zip(&a) {
                if gi.stratum == Some(stratum) {
                    n[s.index()] += gi.size as f64;
                }
            }
            let total: f64 = n.iter().sum();
            for s in 0..3 {
                let want = F[s] * total;
                assert!((n[s] - want).abs() <= max_group, "stratum {stratum} split {s}: {} items, target {want}", n[s]);
            }
        }
    }

    #[test]
    fn rare_classes_land_in_train_first() {
        let one = |key: &str, stratum| GroupInput { key: key.into(), size: 1, stratum: Some(stratum), pinned: vec![] };
        let g: Vec<GroupInput> = (0..10).map(|i| one(&format!("k{i}"), 0)).collect();
        for n in 1..=3 {
            assert!(assign(&g[..n], 3, F).iter().all(|s| *s == Split::Train), "{n} groups");
        }
        let mut counts = [0; 3];
        for s in assign(&g, 3, F) {
            counts[s.index()] += 1;
        }
        assert_eq!(counts, [8, 1, 1]);
    }

    #[test]
    fn adding_groups_never_moves_pinned_ones_and_keeps_balance() {
        let old = groups(1000, 4, "a");
        let first = assign(&old, 5, F);
        // The next run: the old groups pinned to their splits, plus 1000 new ones interleaved in key order.
        let mut next: Vec<GroupInput> =
            old.iter().zip(&first).map(|(g, s)| GroupInput { pinned: vec![*s], ..g.clone() }).collect();
        next.extend(groups(1000, 4, "a0").into_iter().map(|g| GroupInput { key: format!("{}x", g.key), ..g }));
        let second = assign(&next, 5, F);
        assert_eq!(second[..1000], first[..]);
        // The new groups top up each stratum towards the targets.
        let max_group = 3.0;
        for stratum in 0..4 {
            let mut n = [0.0; 3];
            for (g, s) in next.iter().zip(&second) {
                if g.stratum == Some(stratum) {
                    n[s.index()] += g.size as f64;
                }
            }
            let total: f64 = n.iter().sum();
            for s in 0..3 {
                assert!((n[s] - F[s] * total).abs() <= max_group, "stratum {stratum}: {n:?}");
            }
        }
        // A group bridging a train and a test item goes to test.
        let bridge = GroupInput { key: "z".into(), size: 3, stratum: None, pinned: vec![Split::Train, Split::Test] };
        assert_eq!(assign(&[bridge], 5, F), [Split::Test]);
    }

    #[test]
    fn hash_is_keyed_and_fixed() {
        assert_ne!(group_hash(0, "a"), group_hash(1, "a"));
        assert_ne!(group_hash(0, "a"), group_hash(0, "b"));
        // Pinned (computed independently with Python's hashlib) so that a change of the hash, which would reshuffle
        // every dataset, cannot go unnoticed.
        assert_eq!(group_hash(42, "1163"), 0xa1b829513b5cd5a6);
    }
}
