//! P2 / P3 of the benchmarks: inference only, through attrd's engine (`Engine::infer_blocking`: the session on its
//! own thread, as the daemon runs it). `scripts/bench-infer` runs this next to ONNX Runtime's Python API on the same
//! model, input, batch and threads (`scripts/bench_infer.py`) and for the INT8 and fp32 bundles; on its own:
//!
//!   cargo bench --bench infer -- BUNDLE TRUSTED_KEY IMAGES_DIR [--batch N] [--threads T] [--seconds S]
//!       [--save-input FILE]
//!
//! The batch is real photos from IMAGES_DIR through the bundle's own preprocessing; `--save-input` writes it as raw
//! little-endian f32 so the peer runs on exactly the same tensor. Prints one JSON line.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use attrd::bundle::Bundle;
use attrd::engine::{Engine, EngineConfig};
use attrd::preprocess::{Limits, Preprocessor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut pos = Vec::new();
    let (mut batch, mut threads, mut seconds, mut save) = (1usize, 1usize, 10.0f64, None::<PathBuf>);
    let mut sessions = 1usize;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--batch" => batch = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            "--sessions" => sessions = val()?.parse()?,
            "--seconds" => seconds = val()?.parse()?,
            "--save-input" => save = Some(PathBuf::from(val()?)),
            _ => pos.push(a),
        }
    }
    if sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    let [bundle, key, images] = &pos[..] else {
        bail!(
            "usage: cargo bench --bench infer -- BUNDLE TRUSTED_KEY IMAGES_DIR [--batch N] [--threads T] [--sessions S] [--seconds S] [--save-input FILE]"
        );
    };
    let bundle = Bundle::open(bundle)?;
    bundle.verify(&attrd::bundle::TrustedKeys::from_files([key])?)?;
    let pre = Preprocessor::new(bundle.manifest().input.clone(), Limits::default())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(images)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let items = files.iter().take(batch).map(|p| pre.prepare_path(p)).collect::<Result<Vec<_>, _>>()?;
    if items.len() < batch {
        bail!("{images} has {} images, the batch needs {batch}", items.len());
    }
    let input = pre.batch(&items);
    if let Some(path) = &save {
        let raw: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path, raw)?;
    }
    let cfg = EngineConfig { intra_threads: threads, sessions, ..EngineConfig::cpu() };
    let engine = Engine::load(&bundle, &cfg)?;
    for _ in 0..5 * sessions {
        engine.infer_blocking(input.clone())?;
    }
    // One caller per session, each sending its next batch as soon as the last one is back, so every session is
    // kept busy, as the daemon's batcher does under load.
    let start = Instant::now();
    let per_caller = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..sessions)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
                    let (mut ms, mut run_ms) = (Vec::new(), Vec::new());
                    while start.elapsed() < Duration::from_secs_f64(seconds) || ms.len() < 10 {
                        let x = input.clone();
                        let t = Instant::now();
                        let out = std::hint::black_box(engine.infer_blocking(x)?);
                        ms.push(t.elapsed().as_secs_f64() * 1e3);
                        run_ms.push(out.run_time.as_secs_f64() * 1e3);
                    }
                    Ok((ms, run_ms))
                })
            })
            .collect();
        callers.into_iter().map(|c| c.join().expect("a bench caller panicked")).collect::<Vec<_>>()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let (mut ms, mut run_ms) = (Vec::new(), Vec::new());
    for r in per_caller {
        let (m, r) = r?;
        ms.extend(m);
        run_ms.extend(r);
    }
    ms.sort_by(f64::total_cmp);
    run_ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "impl": "attrd",
            "model": bundle.label(),
            "precision": bundle.manifest().precision.as_str(),
            "batch": batch,
            "threads": threads,
            "sessions": sessions,
            "runs": ms.len(),
            "median_ms": q(0.5),
            "p90_ms": q(0.9),
            // Inside `Session::run` alone: the rest of median_ms is the engine's queueing and output copies.
            "session_run_median_ms": run_ms[run_ms.len() / 2],
            // One session: from the median batch time, as the peer reports it; several: all batches over the time.
            "images_per_s": if sessions == 1 { batch as f64 * 1e3 / q(0.5) } else { (batch * ms.len()) as f64 / elapsed },
        })
    );
    Ok(())
}
