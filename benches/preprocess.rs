//! P5 of the benchmarks: one studio photo (e.g. a 24 MP JPEG) → the model's 224×224 tensor, on the calling thread.
//! `scripts/bench-preprocess` runs this next to the Pillow peers (`scripts/bench_preprocess.py`) pinned to the
//! same core and reports the ratios; on its own:
//!
//!   cargo bench --bench preprocess -- IMAGE [ITERATIONS]
//!
//! Prints one JSON line: median / p90 milliseconds of `Preprocessor::prepare` on the in-memory file (reading the
//! file is excluded, as for the peers). For a JPEG it also times the decode step alone, attrd's 1/8-scale decoder
//! against libjpeg-turbo's own 1/8 decode (the path it replaced), alternating, `decode_only_ms`.

use std::time::Instant;

use attrd::preprocess::{InputSpec, Limits, Preprocessor};

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let Some(path) = args.first() else {
        anyhow::bail!("usage: cargo bench --bench preprocess -- IMAGE [ITERATIONS]");
    };
    let iterations: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let bytes = std::fs::read(path)?;
    let pre = Preprocessor::new(InputSpec::imagenet(224, 224), Limits::default())?;
    let decoded = pre.decode(&bytes)?;
    // Warm-up: page in the code and the allocator's arenas.
    for _ in 0..3 {
        std::hint::black_box(pre.prepare(&bytes)?);
    }
    let mut ms = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        std::hint::black_box(pre.prepare(&bytes)?);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    let decode_only = decode_only(&bytes, iterations);
    println!(
        "{}",
        serde_json::json!({
            "impl": "attrd",
            "image": path,
            "width": decoded.original_width,
            "height": decoded.original_height,
            "dct_scale": decoded.dct_scale,
            "codec": format!("{:?}", decoded.codec),
            "iterations": iterations,
            "median_ms": q(0.5),
            "p90_ms": q(0.9),
            "decode_only_ms": decode_only,
        })
    );
    Ok(())
}

/// Median ms of the 1/8-scale decode alone: ours and libjpeg-turbo's, interleaved call by call so drift in the
/// machine's speed hits both alike. Null when the file is not one the 1/8 decoder takes.
#[cfg(feature = "turbojpeg")]
fn decode_only(bytes: &[u8], iterations: usize) -> serde_json::Value {
    use attrd::preprocess::{decode_one_eighth, libjpeg_turbo_one_eighth};
    if decode_one_eighth(bytes, u64::MAX).is_err() {
        return serde_json::Value::Null;
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let time = |f: &dyn Fn() -> bool, into: &mut Vec<f64>| {
        let t = Instant::now();
        assert!(std::hint::black_box(f()));
        into.push(t.elapsed().as_secs_f64() * 1e3);
    };
    for _ in 0..iterations {
        time(&|| decode_one_eighth(bytes, u64::MAX).is_ok(), &mut ours);
        time(&|| libjpeg_turbo_one_eighth(bytes, u64::MAX).is_ok(), &mut theirs);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    serde_json::json!({ "attrd_one_eighth": median(&mut ours), "libjpeg_turbo_one_eighth": median(&mut theirs) })
}

#[cfg(not(feature = "turbojpeg"))]
fn decode_only(_: &[u8], _: usize) -> serde_json::Value {
    serde_json::Value::Null
}
