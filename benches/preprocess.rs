//! P5 of the benchmarks: one studio photo (e.g. a 24 MP JPEG) → the model's 224×224 tensor, on the calling thread.
//! `scripts/bench-preprocess` runs this next to the Pillow peers (`scripts/bench_preprocess.py`) pinned to the
//! same core and reports the ratios; on its own:
//!
//!   cargo bench --bench preprocess -- IMAGE [ITERATIONS]
//!
//! Prints one JSON line: median / p90 milliseconds of `Preprocessor::prepare` on the in-memory file (reading the
//! file is excluded, as for the peers).

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
        })
    );
    Ok(())
}
