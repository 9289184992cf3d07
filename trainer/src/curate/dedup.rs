//! Duplicate grouping: union-find over exact copies (same SHA-256), near duplicates (difference hash within a
//! Hamming distance *and* similar grey thumbnails) and grouping columns; and the label conflicts inside groups.

use super::scan::{ImageInfo, THUMB_LEN};
use super::schema::Canon;
use std::collections::{BTreeMap, HashMap};

/// Disjoint sets over `0..n` with path halving and union by size.
#[derive(Debug, Clone)]
pub(crate) struct UnionFind {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl UnionFind {
    pub fn new(n: usize) -> Self {
        UnionFind { parent: (0..n as u32).collect(), size: vec![1; n] }
    }

    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] as usize != x {
            let grand = self.parent[self.parent[x] as usize];
            self.parent[x] = grand;
            x = grand as usize;
        }
        x
    }

    /// Joins the sets of `a` and `b`; returns whether they were separate.
    pub fn union(&mut self, a: usize, b: usize) -> bool {
        let (mut a, mut b) = (self.find(a), self.find(b));
        if a == b {
            return false;
        }
        if self.size[a] < self.size[b] {
            std::mem::swap(&mut a, &mut b);
        }
        self.parent[b] = a as u32;
        self.size[a] += self.size[b];
        true
    }

    /// The members of each set with at least `min` members, each sorted, sets ordered by their first member.
    pub fn groups(&mut self, min: usize) -> Vec<Vec<usize>> {
        let mut by_root: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for i in 0..self.parent.len() {
            let r = self.find(i);
            by_root.entry(r).or_default().push(i);
        }
        let mut out: Vec<Vec<usize>> = by_root.into_values().filter(|g| g.len() >= min).collect();
        out.sort_by_key(|g| g[0]);
        out
    }
}

pub(crate) fn hamming(a: &[u64; 4], b: &[u64; 4]) -> u32 {
    // Unrolled: this runs for every candidate pair, and tests run it unoptimized.
    (a[0] ^ b[0]).count_ones() + (a[1] ^ b[1]).count_ones() + (a[2] ^ b[2]).count_ones() + (a[3] ^ b[3]).count_ones()
}

/// Pearson correlation of two thumbnails: 1 for the same picture up to brightness and contrast, whatever the
/// size of the white background around it. A thumbnail without any variation correlates with nothing.
pub(crate) fn correlation(a: &[u8; THUMB_LEN], b: &[u8; THUMB_LEN]) -> f64 {
    let (mut sa, mut sb, mut saa, mut sbb, mut sab) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (u64::from(x), u64::from(y));
        (sa, sb, saa, sbb, sab) = (sa + x, sb + y, saa + x * x, sbb + y * y, sab + x * y);
    }
    // n² times the covariance and variances, exact in integers (at most 1024² · 255² < 2^37).
    let n = THUMB_LEN as i64;
    let cov = n * sab as i64 - sa as i64 * sb as i64;
    let va = n * saa as i64 - (sa * sa) as i64;
    let vb = n * sbb as i64 - (sb * sb) as i64;
    if va <= 0 || vb <= 0 {
        return 0.0;
    }
    cov as f64 / ((va as f64).sqrt() * (vb as f64).sqrt())
}

/// Spreads hash bits so that each pigeonhole chunk samples the whole image. Without it a chunk is a band of
/// adjacent rows, and the white background of catalog photos makes that band all zeros for most images: one
/// bucket with nearly everything in it.
fn permute(h: &[u64; 4]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for i in 0..256 {
        // 167 is odd, so i -> 167 i mod 256 is a bijection on bit positions.
        let src = (i * 167) % 256;
        if h[src / 64] >> (src % 64) & 1 == 1 {
            out[i / 64] |= 1 << (i % 64);
        }
    }
    out
}

/// Bits `lo..hi` of a 256-bit value, other bits cleared.
fn chunk(h: &[u64; 4], lo: usize, hi: usize) -> [u64; 4] {
    let mut out = [0u64; 4];
    for (w, word) in out.iter_mut().enumerate() {
        let (wlo, whi) = (w * 64, w * 64 + 64);
        let (a, b) = (lo.max(wlo), hi.min(whi));
        if a < b {
            let width = b - a;
            let mask = if width == 64 { u64::MAX } else { ((1u64 << width) - 1) << (a - wlo) };
            *word = h[w] & mask;
        }
    }
    out
}

/// Joins images that are near duplicates: Hamming distance of the difference hashes at most `max_distance` and
/// thumbnail correlation at least `min_correlation`. Returns how many pairs joined two groups.
///
/// Candidates come from pigeonhole buckets: split the 256 bits into `max_distance + 1` disjoint chunks; two hashes
/// within the distance agree exactly on at least one chunk. Every candidate is then checked in full, so the result
/// equals an all-pairs comparison. Pairs already joined in `uf` are skipped (joining them again changes nothing),
/// and each accepted pair is joined there.
pub(crate) fn near_duplicates(
    infos: &[&ImageInfo],
    max_distance: u32,
    min_correlation: f64,
    uf: &mut UnionFind,
) -> usize {
    let permuted: Vec<[u64; 4]> = infos.iter().map(|i| permute(&i.dhash)).collect();
    let chunks = (max_distance as usize + 1).min(256);
    let mut joined = 0;
    for c in 0..chunks {
        let (lo, hi) = (c * 256 / chunks, (c + 1) * 256 / chunks);
        let mut buckets: HashMap<[u64; 4], Vec<u32>> = HashMap::new();
        for (i, p) in permuted.iter().enumerate() {
            buckets.entry(chunk(p, lo, hi)).or_default().push(i as u32);
        }
        for members in buckets.values().filter(|m| m.len() > 1) {
            for (k, &a) in members.iter().enumerate() {
                for &b in &members[k + 1..] {
                    let (a, b) = (a as usize, b as usize);
                    if uf.find(a) == uf.find(b) {
                        continue;
                    }
                    if hamming(&infos[a].dhash, &infos[b].dhash) <= max_distance
                        && correlation(&infos[a].thumb, &infos[b].thumb) >= min_correlation
                    {
                        uf.union(a, b);
                        joined += 1;
                    }
                }
            }
        }
    }
    joined
}

/// Disagreeing labels inside one duplicate group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// `exact` (identical files) or `near` (near-duplicate group with at least two distinct images).
    pub kind: &'static str,
    /// The group's key (its smallest item id).
    pub group: String,
    pub attribute: String,
    /// Each distinct value (multi-label sets joined by `|`) with the ids that carry it.
    pub values: Vec<(String, Vec<String>)>,
}

/// For each attribute, the distinct known values among `members` (ids and canonical values given), if more than
/// one. Missing and not-applicable are not values: they do not contradict anything.
pub(crate) fn conflicts(
    kind: &'static str,
    group: &str,
    members: &[(&str, &[Canon])],
    attributes: &[String],
) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (a, name) in attributes.iter().enumerate() {
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, canon) in members {
            if let Canon::Values(vs) = &canon[a] {
                let mut vs = vs.clone();
                vs.sort();
                values.entry(vs.join("|")).or_default().push(id.to_string());
            }
        }
        if values.len() > 1 {
            out.push(Conflict {
                kind,
                group: group.to_string(),
                attribute: name.clone(),
                values: values.into_iter().collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image with the given hash and a thumbnail that is the same picture for every `level` (a ramp offset by
    /// it), so that only the hash decides.
    fn info(dhash: [u64; 4], level: u8) -> ImageInfo {
        let mut thumb = [0u8; THUMB_LEN];
        for (i, v) in thumb.iter_mut().enumerate() {
            *v = level.saturating_add((i % 97) as u8);
        }
        ImageInfo { sha256: [0; 32], width: 60, height: 80, dhash, thumb }
    }

    /// A hash with the given bit positions flipped relative to `base`.
    fn flip(base: [u64; 4], bits: &[usize]) -> [u64; 4] {
        let mut h = base;
        for &b in bits {
            h[b / 64] ^= 1 << (b % 64);
        }
        h
    }

    #[test]
    fn near_duplicates_match_brute_force_at_the_hamming_boundary() {
        let base = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210, 0x0f0f_0f0f_f0f0_f0f0, 0xdead_beef_cafe_f00d];
        // Distances to item 0: 0..=14 bits flipped, spread over the words (adjacent bits, the worst case for
        // chunking without the permutation).
        let infos: Vec<ImageInfo> =
            (0..15).map(|d| info(flip(base, &(0..d).map(|k| k * 17).collect::<Vec<_>>()), 100)).collect();
        let refs: Vec<&ImageInfo> = infos.iter().collect();
        for max in [0, 3, 8, 12] {
            let mut uf = UnionFind::new(refs.len());
            near_duplicates(&refs, max, 0.99, &mut uf);
            let mut brute = UnionFind::new(refs.len());
            for i in 0..refs.len() {
                for j in i + 1..refs.len() {
                    if hamming(&refs[i].dhash, &refs[j].dhash) <= max {
                        brute.union(i, j);
                    }
                }
            }
            assert_eq!(uf.groups(1), brute.groups(1), "max distance {max}");
            // Item `max` is exactly at the limit from item 0, item `max + 1` one bit beyond; chains through
            // intermediate items may still join it, so check the direct pair with a two-item run.
            let pair = [refs[0], refs[max as usize]];
            let mut uf = UnionFind::new(2);
            near_duplicates(&pair, max, 0.99, &mut uf);
            assert_eq!(uf.find(0), uf.find(1), "distance {max} should match");
            let pair = [refs[0], refs[max as usize + 1]];
            let mut uf = UnionFind::new(2);
            near_duplicates(&pair, max, 0.99, &mut uf);
            assert_ne!(uf.find(0), uf.find(1), "distance {} should not match", max + 1);
        }
    }

    #[test]
    fn near_duplicates_need_correlated_thumbnails_too() {
        let h = [1, 2, 3, 4];
        let ramp = |f: &dyn Fn(usize) -> u8| {
            let mut t = [0u8; THUMB_LEN];
            for (i, v) in t.iter_mut().enumerate() {
                *v = f(i);
            }
            ImageInfo { sha256: [0; 32], width: 60, height: 80, dhash: h, thumb: t }
        };
        // A product and a darker shade of it (same shape: correlation 1), and another product on the same white
        // background whose thumbnail differs in only a few cells.
        let a = ramp(&|i| if (400..560).contains(&i) { 60 } else { 255 });
        let darker = ramp(&|i| if (400..560).contains(&i) { 20 } else { 255 });
        let other = ramp(&|i| if (720..880).contains(&i) { 60 } else { 255 });
        assert!((correlation(&a.thumb, &darker.thumb) - 1.0).abs() < 1e-12);
        assert!(correlation(&a.thumb, &other.thumb) < 0.0);
        let mut uf = UnionFind::new(3);
        near_duplicates(&[&a, &darker, &other], 12, 0.995, &mut uf);
        assert_eq!(uf.groups(2), [vec![0, 1]]);
        let flat = ramp(&|_| 7);
        assert_eq!(correlation(&flat.thumb, &flat.thumb), 0.0);
    }

    #[test]
    fn permutation_is_a_bijection() {
        for bit in [0usize, 1, 63, 64, 200, 255] {
            let h = flip([0; 4], &[bit]);
            let p = permute(&h);
            assert_eq!(p.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
        }
        let all = permute(&[u64::MAX; 4]);
        assert_eq!(all, [u64::MAX; 4]);
        assert_eq!(chunk(&[u64::MAX; 4], 60, 70), [0xf << 60, 0x3f, 0, 0]);
    }

    #[test]
    fn conflicts_ignore_missing_and_sort_multi_values() {
        let v = |s: &[&str]| Canon::Values(s.iter().map(|x| x.to_string()).collect());
        let a = [v(&["Blue"]), v(&["x", "y"]), Canon::Missing];
        let b = [v(&["Black"]), v(&["y", "x"]), v(&["Men"])];
        let c = [v(&["Blue"]), Canon::NotApplicable, Canon::Missing];
        let attrs = vec!["colour".to_string(), "tags".to_string(), "gender".to_string()];
        let got = conflicts("exact", "1", &[("1", &a), ("2", &b), ("3", &c)], &attrs);
        assert_eq!(
            got,
            [Conflict {
                kind: "exact",
                group: "1".into(),
                attribute: "colour".into(),
                values: vec![("Black".into(), vec!["2".into()]), ("Blue".into(), vec!["1".into(), "3".into()])],
            }]
        );
    }
}
