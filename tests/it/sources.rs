//! Capture sources end to end through the real pipeline (ONNX Runtime on CPU, real photos, a real file system):
//! the hot folder (pre-existing and new files, done/ only after durable, failures, retries, backpressure, a
//! directory that disappears), fake cameras (YUYV/MJPEG frames, triggers, unplug/replug) and frame conversion.

use crate::common::fashion_rows;
use crate::pipeline::{ack_all, cfg, engine, engine_cell, eventually, photos, reference_probs, top1};
use attrd::bundle;
use attrd::engine::postprocess;
use attrd::outbox::{NewMessage, Outbox, OutboxConfig};
use attrd::payload::{ResultPayload, SourceKind};
use attrd::pipeline::{Finished, NotStored, Pipeline, PipelineConfig};
use attrd::sources::fake::{FakeCamera, mjpeg_frame, rgb_to_yuyv};
use attrd::sources::hotfolder::{HotfolderConfig, HotfolderSource};
use attrd::sources::v4l2::{Frame, PixelFormat, frame_to_jpeg, yuyv_to_rgb};
use attrd::sources::{
    CameraSource, HeldFrames, Origin, Shot, ShutdownSignal, Source, SourceConfig, SourceError, Trigger, V4l2Config,
    build, build_with, run_all,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

fn hot_cfg(dir: &Path) -> HotfolderConfig {
    HotfolderConfig {
        dir: dir.to_path_buf(),
        settle: Duration::from_millis(300),
        rescan: Duration::from_secs(2),
        retry_min: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
        ..HotfolderConfig::default()
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Writes a file the way a careful producer does: into a dotfile, then renamed into place.
fn drop_file(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

struct Running {
    shutdown: ShutdownSignal,
    sources: tokio::task::JoinHandle<()>,
    pipeline: Pipeline,
}

impl Running {
    fn start(sources: Vec<Box<dyn Source>>, pcfg: PipelineConfig, out: mpsc::Sender<Finished>) -> Self {
        let pipeline = Pipeline::spawn(engine_cell(), pcfg, "test-node", out).unwrap();
        let shutdown = ShutdownSignal::new();
        let sources = tokio::spawn(run_all(sources, pipeline.shots.clone(), shutdown.subscribe()));
        Running { shutdown, sources, pipeline }
    }

    async fn stop(self) -> attrd::pipeline::StatsSnapshot {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.sources).await.expect("sources stop").unwrap();
        drop(self.pipeline.shots);
        tokio::time::timeout(Duration::from_secs(30), self.pipeline.task).await.expect("pipeline drains").unwrap();
        self.pipeline.stats.snapshot()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_processes_existing_and_new_files_and_moves_them_only_once_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let p = photos(4);
    // Present before the source starts.
    std::fs::copy(&p[0], hot.join("SKU1_front.jpg")).unwrap();
    std::fs::copy(&p[1], hot.join("SKU2.jpg")).unwrap();
    // Never to be touched.
    std::fs::copy(&p[0], hot.join(".hidden.jpg")).unwrap();
    std::fs::write(hot.join("notes.txt"), "not an image").unwrap();
    std::fs::copy(&p[0], hot.join("SKU9_partial.jpg.part")).unwrap();

    let (out, mut out_rx) = mpsc::channel::<Finished>(8);
    let hot2 = hot.clone();
    let consumer = tokio::spawn(async move {
        let mut got: Vec<ResultPayload> = Vec::new();
        while let Some(f) = out_rx.recv().await {
            let path = PathBuf::from(f.payload.source.path.clone().unwrap());
            // Not durable yet, so the file must still be where it was.
            for _ in 0..3 {
                assert!(path.is_file(), "{} left the hot folder before its result was durable", path.display());
                assert!(!hot2.join("done").join(path.file_name().unwrap()).exists());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            f.durable.send(Ok(())).unwrap();
            got.push(f.payload);
        }
        got
    });
    let src = HotfolderSource::new(hot_cfg(&hot)).unwrap();
    let run = Running::start(vec![Box::new(src)], cfg(), out);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Arriving while it runs: a plain copy (written in place) and a PNG renamed in.
    std::fs::copy(&p[2], hot.join("SKU3_side.jpg")).unwrap();
    let png = {
        let img = image::open(&p[3]).unwrap();
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    };
    drop_file(&hot, "sku4_back.PNG", &png);

    let done = hot.join("done");
    assert!(
        eventually(Duration::from_secs(60), || names(&done).len() == 4).await,
        "done/ has {:?}, hot folder {:?}",
        names(&done),
        names(&hot)
    );
    let stats = run.stop().await;
    let got = consumer.await.unwrap();
    assert_eq!(names(&done), ["SKU1_front.jpg", "SKU2.jpg", "SKU3_side.jpg", "sku4_back.PNG"]);
    assert_eq!(names(&hot), [".hidden.jpg", "SKU9_partial.jpg.part", "done", "notes.txt"]);
    let mut skus: Vec<&str> = got.iter().map(|r| r.sku.as_str()).collect();
    skus.sort();
    assert_eq!(skus, ["SKU1", "SKU2", "SKU3", "sku4"]);
    for r in &got {
        assert_eq!(r.source.kind, SourceKind::Hotfolder);
        let moved = done.join(Path::new(r.source.path.as_deref().unwrap()).file_name().unwrap());
        assert_eq!(r.source.image_sha256, bundle::sha256_bytes(&std::fs::read(&moved).unwrap()));
        assert!(r.attributes["imagenet"].value.is_some());
    }
    assert_eq!((stats.received, stats.durable), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_sends_bad_files_to_failed_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let (out, out_rx) = mpsc::channel(8);
    let consumer = ack_all(out_rx);
    let mut c = hot_cfg(&hot);
    c.max_file_bytes = 1_000_000;
    let run = Running::start(vec![Box::new(HotfolderSource::new(c).unwrap())], cfg(), out);
    let good = photos(1);
    drop_file(&hot, "BAD1_front.jpg", b"<html>502 Bad Gateway</html>");
    drop_file(&hot, "_noskuhere.jpg", &std::fs::read(&good[0]).unwrap());
    drop_file(&hot, "HUGE_1.jpg", &vec![0xFF; 1_000_001]);
    drop_file(&hot, "GOOD_1.jpg", &std::fs::read(&good[0]).unwrap());
    // Good photos whose SKUs cannot name a result topic: refused at once, not processed and retried forever.
    let long = "品".repeat(43);
    for name in ["$SYS_front.jpg", "A+B_front.jpg", &format!("{long}_front.jpg")] {
        drop_file(&hot, name, &std::fs::read(&good[0]).unwrap());
    }
    let failed = hot.join("failed");
    assert!(
        eventually(Duration::from_secs(60), || names(&failed).len() == 12 && names(&hot.join("done")).len() == 1).await,
        "failed/ {:?}, done/ {:?}",
        names(&failed),
        names(&hot.join("done"))
    );
    run.stop().await;
    assert_eq!(consumer.await.unwrap().len(), 1);
    let reason = |n: &str| std::fs::read_to_string(failed.join(format!("{n}.error.txt"))).unwrap();
    assert!(reason("BAD1_front.jpg").contains("unrecognised image format"), "{}", reason("BAD1_front.jpg"));
    assert!(reason("_noskuhere.jpg").contains("SKU"), "{}", reason("_noskuhere.jpg"));
    assert!(reason("HUGE_1.jpg").contains("max_file_bytes"), "{}", reason("HUGE_1.jpg"));
    assert!(reason("$SYS_front.jpg").contains("must not start with '$'"), "{}", reason("$SYS_front.jpg"));
    assert!(reason("A+B_front.jpg").contains("contains '+'"), "{}", reason("A+B_front.jpg"));
    let r = reason(&format!("{long}_front.jpg"));
    assert!(r.contains("129 bytes long"), "{r}");
    assert_eq!(std::fs::read(failed.join("BAD1_front.jpg")).unwrap(), b"<html>502 Bad Gateway</html>");
    assert_eq!(names(&hot.join("done")), ["GOOD_1.jpg"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_keeps_a_file_whose_result_could_not_be_stored_and_retries_it() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let (out, mut out_rx) = mpsc::channel::<Finished>(8);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let file = hot.join("RETRY_1.jpg");
    let file2 = file.clone();
    let consumer = tokio::spawn(async move {
        let mut n = 0;
        while let Some(f) = out_rx.recv().await {
            n += 1;
            seen2.lock().unwrap().push(f.payload.sku.clone());
            if n == 1 {
                f.durable.send(Err(NotStored::Later("outbox full".into()))).unwrap();
                // Still there, and stays there during the backoff.
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(file2.is_file());
            } else {
                f.durable.send(Ok(())).unwrap();
            }
        }
    });
    let run = Running::start(vec![Box::new(HotfolderSource::new(hot_cfg(&hot)).unwrap())], cfg(), out);
    drop_file(&hot, "RETRY_1.jpg", &std::fs::read(&photos(1)[0]).unwrap());
    assert!(eventually(Duration::from_secs(60), || hot.join("done/RETRY_1.jpg").is_file()).await);
    assert!(!file.exists());
    // Same name again later: no overwrite in done/.
    drop_file(&hot, "RETRY_1.jpg", &std::fs::read(&photos(2)[1]).unwrap());
    assert!(eventually(Duration::from_secs(60), || hot.join("done/RETRY_1-1.jpg").is_file()).await);
    let stats = run.stop().await;
    consumer.await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["RETRY", "RETRY", "RETRY"]);
    assert_eq!((stats.retry_later, stats.durable), (1, 2));
    assert_eq!(names(&hot.join("done")), ["RETRY_1-1.jpg", "RETRY_1.jpg"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_takes_photos_whose_modification_time_is_beyond_the_year_9999() {
    // tmpfs keeps 64-bit timestamps (ext4 stops at 2446), as do btrfs and some network shares.
    let shm = Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs tmpfs at /dev/shm");
    let tmp = tempfile::tempdir_in(shm).unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let p = photos(2);
    let far = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400); // 10000-01-02
    std::fs::copy(&p[0], hot.join("FAR_1.jpg")).unwrap();
    std::fs::File::options().write(true).open(hot.join("FAR_1.jpg")).unwrap().set_modified(far).unwrap();
    assert_eq!(std::fs::metadata(hot.join("FAR_1.jpg")).unwrap().modified().unwrap(), far, "tmpfs kept the time");

    let (out, mut out_rx) = mpsc::channel::<Finished>(8);
    let consumer = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(f) = out_rx.recv().await {
            f.durable.send(Ok(())).unwrap();
            got.push(f.payload);
        }
        got
    });
    let before = time::OffsetDateTime::now_utc();
    let run = Running::start(vec![Box::new(HotfolderSource::new(hot_cfg(&hot)).unwrap())], cfg(), out);
    // Before, this photo panicked the folder's thread: nothing after it was taken, at every start.
    assert!(eventually(Duration::from_secs(60), || hot.join("done/FAR_1.jpg").is_file()).await, "{:?}", names(&hot));
    drop_file(&hot, "NEXT_1.jpg", &std::fs::read(&p[1]).unwrap());
    assert!(eventually(Duration::from_secs(60), || hot.join("done/NEXT_1.jpg").is_file()).await, "{:?}", names(&hot));
    let stats = run.stop().await;
    let got = consumer.await.unwrap();
    let far_result = got.iter().find(|r| r.sku == "FAR").expect("a result for FAR");
    assert!(far_result.captured_at >= before, "capture time {} falls back to now", far_result.captured_at);
    assert_eq!((stats.durable, stats.failed), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_processes_a_photo_replaced_while_its_predecessor_was_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let (out, mut out_rx) = mpsc::channel::<Finished>(8);
    let run = Running::start(vec![Box::new(HotfolderSource::new(hot_cfg(&hot)).unwrap())], cfg(), out);
    let p = photos(2);
    let (old, new) = (std::fs::read(&p[0]).unwrap(), std::fs::read(&p[1]).unwrap());
    drop_file(&hot, "SWAP_front.jpg", &old);
    let first = tokio::time::timeout(Duration::from_secs(60), out_rx.recv()).await.unwrap().unwrap();
    assert_eq!(first.payload.source.image_sha256, bundle::sha256_bytes(&old));
    // The studio exports the same name again while the first result is being stored.
    drop_file(&hot, "SWAP_front.jpg", &new);
    first.durable.send(Ok(())).unwrap();
    // The new photo is not filed unprocessed: it comes through the pipeline too, and only then reaches done/.
    let second = tokio::time::timeout(Duration::from_secs(60), out_rx.recv()).await.unwrap().unwrap();
    assert_eq!(second.payload.source.image_sha256, bundle::sha256_bytes(&new));
    assert!(names(&hot.join("done")).is_empty(), "{:?}", names(&hot.join("done")));
    second.durable.send(Ok(())).unwrap();
    assert!(eventually(Duration::from_secs(60), || hot.join("done/SWAP_front.jpg").is_file()).await);
    assert_eq!(std::fs::read(hot.join("done/SWAP_front.jpg")).unwrap(), new);
    let stats = run.stop().await;
    assert_eq!(stats.durable, 2);
    assert!(out_rx.try_recv().is_err(), "a third result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_waits_for_a_slow_writer_to_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let (out, out_rx) = mpsc::channel(8);
    let consumer = ack_all(out_rx);
    // A settle time far above the writer's pauses: only the close-after-write event can release the file early.
    let c = HotfolderConfig { settle: Duration::from_secs(2), ..hot_cfg(&hot) };
    let run = Running::start(vec![Box::new(HotfolderSource::new(c).unwrap())], cfg(), out);
    let bytes = std::fs::read(&photos(1)[0]).unwrap();
    {
        // Written in place in chunks, with pauses shorter than `settle`, the file kept open throughout.
        use std::io::Write;
        let mut f = std::fs::File::create(hot.join("SLOW_1.jpg")).unwrap();
        for chunk in bytes.chunks(bytes.len().div_ceil(5)) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert!(eventually(Duration::from_secs(60), || hot.join("done/SLOW_1.jpg").is_file()).await);
    run.stop().await;
    let got = consumer.await.unwrap();
    assert_eq!(got.len(), 1, "a partial file was taken");
    assert_eq!(got[0].source.image_sha256, bundle::sha256_bytes(&bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_backpressure_holds_files_while_the_outbox_is_stuck() {
    const N: usize = 30;
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let p = photos(5);
    for i in 0..N {
        std::fs::copy(&p[i % p.len()], hot.join(format!("BP{i:02}_x.jpg"))).unwrap();
    }
    let (out, mut out_rx) = mpsc::channel::<Finished>(1);
    let pcfg =
        PipelineConfig { max_batch: 2, queue: 2, decode_workers: 1, max_wait: Duration::from_millis(5), ..cfg() };
    let run = Running::start(vec![Box::new(HotfolderSource::new(hot_cfg(&hot)).unwrap())], pcfg, out);
    let stats = run.pipeline.stats.clone();
    let mut last = u64::MAX;
    assert!(
        eventually(Duration::from_secs(60), || {
            let r = stats.snapshot().received;
            let settled = r == last && r > 0;
            last = r;
            settled
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = stats.snapshot();
    // Same bound as the pipeline's own backpressure test: the hot folder cannot push more in than the stages hold.
    assert!(st.received <= 10, "intake did not stop: {st:?}");
    assert!(names(&hot.join("done")).is_empty(), "nothing is durable yet");
    assert_eq!(names(&hot).len(), N);
    let consumer = tokio::spawn(async move {
        let mut n = 0;
        while let Some(f) = out_rx.recv().await {
            f.durable.send(Ok(())).unwrap();
            n += 1;
        }
        n
    });
    assert!(
        eventually(Duration::from_secs(120), || names(&hot.join("done")).len() == N).await,
        "done/ has {}",
        names(&hot.join("done")).len()
    );
    run.stop().await;
    assert_eq!(consumer.await.unwrap(), N);
    assert_eq!(names(&hot), ["done"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_folder_survives_its_directory_being_removed_and_recreated() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    // Missing at start-up: reported and retried.
    let (out, out_rx) = mpsc::channel(8);
    let consumer = ack_all(out_rx);
    let mut c = hot_cfg(&hot);
    c.done_dir = Some(tmp.path().join("done"));
    c.retry_max = Duration::from_millis(400);
    let run = Running::start(vec![Box::new(HotfolderSource::new(c).unwrap())], cfg(), out);
    let p = photos(2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::create_dir(&hot).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop_file(&hot, "A_1.jpg", &std::fs::read(&p[0]).unwrap());
    assert!(eventually(Duration::from_secs(60), || tmp.path().join("done/A_1.jpg").is_file()).await);
    // Removed and recreated while running.
    std::fs::remove_dir_all(&hot).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::create_dir(&hot).unwrap();
    drop_file(&hot, "B_1.jpg", &std::fs::read(&p[1]).unwrap());
    assert!(
        eventually(Duration::from_secs(60), || tmp.path().join("done/B_1.jpg").is_file()).await,
        "hot folder {:?}",
        names(&hot)
    );
    run.stop().await;
    let mut skus: Vec<_> = consumer.await.unwrap().into_iter().map(|r| r.sku).collect();
    skus.sort();
    assert_eq!(skus, ["A", "B"]);
}

/// BT.601 limited-range RGB → YUYV written independently of the library (floating point, chroma of the pair's mean),
/// so that a conversion bug cannot cancel itself out.
fn yuyv_fixture(img: &image::RgbImage, stride_pad: usize) -> (Vec<u8>, u32) {
    let (w, h) = img.dimensions();
    let stride = (w as usize).div_ceil(2) * 4 + stride_pad;
    let mut data = vec![0u8; stride * h as usize];
    for y in 0..h {
        for pair in 0..w.div_ceil(2) {
            let px = |x: u32| img.get_pixel(x.min(w - 1), y).0.map(f64::from);
            let (a, b) = (px(2 * pair), px(2 * pair + 1));
            let luma = |p: [f64; 3]| 16.0 + (65.481 * p[0] + 128.553 * p[1] + 24.966 * p[2]) / 255.0;
            let m = [(a[0] + b[0]) / 2.0, (a[1] + b[1]) / 2.0, (a[2] + b[2]) / 2.0];
            let cb = 128.0 + (-37.797 * m[0] - 74.203 * m[1] + 112.0 * m[2]) / 255.0;
            let cr = 128.0 + (112.0 * m[0] - 93.786 * m[1] - 18.214 * m[2]) / 255.0;
            let q = |v: f64| v.round().clamp(0.0, 255.0) as u8;
            let o = y as usize * stride + pair as usize * 4;
            data[o..o + 4].copy_from_slice(&[q(luma(a)), q(cb), q(luma(b)), q(cr)]);
        }
    }
    (data, stride as u32)
}

fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let s: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| u64::from(x.abs_diff(*y))).sum();
    s as f64 / a.as_raw().len() as f64
}

#[test]
fn yuyv_frames_of_a_real_photo_convert_back_to_the_photo() {
    let photo = image::open(&photos(1)[0]).unwrap().to_rgb8();
    for pad in [0, 12] {
        let (data, stride) = yuyv_fixture(&photo, pad);
        let rgb = yuyv_to_rgb(&data, photo.width(), photo.height(), stride).unwrap();
        let d = mean_abs_diff(&rgb, &photo);
        // Only 4:2:2 chroma subsampling and 8-bit rounding separate them.
        assert!(d < 3.0, "pad {pad}: mean abs difference {d}");
        let frame = Frame { format: PixelFormat::Yuyv, width: photo.width(), height: photo.height(), stride, data };
        let jpeg = frame_to_jpeg(&frame, 92).unwrap();
        let decoded = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap().to_rgb8();
        let d = mean_abs_diff(&decoded, &photo);
        assert!(d < 6.0, "pad {pad}: after JPEG, mean abs difference {d}");
    }
    // The library's own encoder (used by the fake camera) agrees with the fixture within rounding.
    let lib = rgb_to_yuyv(&photo);
    let (data, _) = yuyv_fixture(&photo, 0);
    let max = lib.data.iter().zip(&data).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max <= 2, "max byte difference {max}");
}

/// The next result, answered durable.
async fn next(rx: &mut mpsc::Receiver<Finished>) -> ResultPayload {
    let f = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.unwrap().unwrap();
    f.durable.send(Ok(())).unwrap();
    f.payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_camera_frames_become_results_and_an_unplugged_camera_is_reopened() {
    // A photo whose class the model is sure of from the original file: frames of it must keep that class.
    let mut chosen = None;
    for (_, f, _) in fashion_rows().into_iter().take(40) {
        let (class, conf) = top1(&postprocess::attributes(engine().manifest(), &reference_probs(&f).await));
        if conf > 0.7 {
            chosen = Some((f, class));
            break;
        }
    }
    let (photo_path, class) = chosen.expect("a photo the model is sure about");
    let photo = image::open(&photo_path).unwrap().to_rgb8();
    let (cam, ctl) = FakeCamera::new("fake0", vec![rgb_to_yuyv(&photo), mjpeg_frame(&photo, 90).unwrap()]);
    let cam_cfg = V4l2Config {
        device: "/dev/fake0".into(),
        name: Some("cam-a".into()),
        format: PixelFormat::Yuyv,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        ..V4l2Config::default()
    };
    let (trig, trig_rx) = mpsc::channel(4);
    let source = CameraSource::new(cam_cfg, Box::new(cam), Some(trig_rx)).unwrap();
    let (out, mut out_rx) = mpsc::channel::<Finished>(8);
    let run = Running::start(vec![Box::new(source)], cfg(), out);
    trig.send(Trigger { sku: "ITEM-1".into() }).await.unwrap();
    let r = next(&mut out_rx).await;
    assert_eq!(r.sku, "ITEM-1");
    assert_eq!(r.source.kind, SourceKind::Fake);
    assert_eq!(r.source.camera.as_deref(), Some("cam-a"));
    assert_eq!(top1(&r.attributes).0, class, "YUYV frame of {}", photo_path.display());
    trig.send(Trigger { sku: "ITEM-2".into() }).await.unwrap();
    let r = next(&mut out_rx).await;
    assert_eq!(r.sku, "ITEM-2");
    assert_eq!(top1(&r.attributes).0, class, "MJPEG frame of {}", photo_path.display());
    assert_eq!(ctl.opens(), 1, "the stream stays open between frames");

    // Unplugged: the trigger waits, the camera is reopened with backoff once it is back, and the frame is taken.
    ctl.unplug();
    trig.send(Trigger { sku: "ITEM-3".into() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(out_rx.is_empty());
    ctl.plug();
    let r = next(&mut out_rx).await;
    assert_eq!(r.sku, "ITEM-3");
    assert_eq!(ctl.opens(), 2);
    assert_eq!(ctl.grabs(), 3);
    let stats = run.stop().await;
    assert_eq!(stats.durable, 3);
}

/// A camera frame exists nowhere else. One whose result cannot be stored yet (outbox full or unwritable) is kept in the
/// outbox database (a real SQLite file) and held in memory when the sources stop for a reload; the next run of the
/// sources, or the next process, sends it again as the same photo (SKU, camera, capture time) until it is stored, and
/// then releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_frames_not_stored_yet_are_kept_across_reloads_and_restarts() {
    let photo = image::open(&photos(1)[0]).unwrap().to_rgb8();
    let (cam, _ctl) = FakeCamera::new("fake0", vec![mjpeg_frame(&photo, 90).unwrap()]);
    let cam_cfg = V4l2Config {
        device: "/dev/fake0".into(),
        name: Some("cam-a".into()),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(100),
        ..V4l2Config::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let outbox =
        Outbox::open(&OutboxConfig { path: tmp.path().join("outbox.sqlite3"), ..OutboxConfig::default() }).unwrap();
    let held = HeldFrames::default();
    assert_eq!(held.attach(&outbox).await.unwrap(), 0);
    let (trig, trig_rx) = mpsc::channel(4);
    let camera = CameraSource::new(cam_cfg, Box::new(cam), Some(trig_rx)).unwrap().holding(held.clone());

    // The outbox refuses everything for now; each refusal is counted per SKU.
    let refusing = |mut rx: mpsc::Receiver<Finished>| {
        tokio::spawn(async move {
            let mut seen: Vec<ResultPayload> = Vec::new();
            while let Some(f) = rx.recv().await {
                f.durable.send(Err(NotStored::Later("the outbox is full".into()))).unwrap();
                seen.push(f.payload);
            }
            seen
        })
    };
    let (out, out_rx) = mpsc::channel::<Finished>(8);
    let first = refusing(out_rx);
    let run = Running::start(vec![Box::new(camera)], cfg(), out);
    for sku in ["HELD-1", "HELD-2"] {
        trig.send(Trigger { sku: sku.into() }).await.unwrap();
    }
    // Let each frame be refused and sent again a few times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    run.stop().await;
    let seen = first.await.unwrap();
    for sku in ["HELD-1", "HELD-2"] {
        assert!(seen.iter().filter(|p| p.sku == sku).count() >= 2, "{sku} was tried again");
    }
    let captured: Vec<_> =
        ["HELD-1", "HELD-2"].iter().map(|sku| seen.iter().find(|p| p.sku == *sku).unwrap().captured_at).collect();
    assert_eq!(held.len(), 2, "both frames are held, none dropped");
    let kept = outbox.kept_frames().await.unwrap();
    let mut kept: Vec<&str> = kept.iter().map(|(_, f)| f.sku.as_str()).collect();
    kept.sort_unstable();
    assert_eq!(kept, ["HELD-1", "HELD-2"], "kept once each");
    // A reload, as the daemon does it: the outbox is let go, closed and opened again from the same file. The frames
    // held in memory keep their keys and are not taken in a second time (before, each reload doubled them).
    held.detach();
    drop(outbox);
    let outbox =
        Outbox::open(&OutboxConfig { path: tmp.path().join("outbox.sqlite3"), ..OutboxConfig::default() }).unwrap();
    assert_eq!(held.attach(&outbox).await.unwrap(), 0, "frames held in memory are not taken in twice");
    assert_eq!(held.len(), 2, "the same two frames, not four");

    // The next run refuses too and is stopped: the frames are held again.
    let (out, out_rx) = mpsc::channel::<Finished>(8);
    let second = refusing(out_rx);
    let run = Running::start(vec![held.source().expect("frames are held")], cfg(), out);
    assert!(held.is_empty(), "taken out while they are sent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.stop().await;
    assert!(second.await.unwrap().len() >= 2);
    assert_eq!(held.len(), 2, "held again");
    assert_eq!(outbox.kept_frames().await.unwrap().len(), 2);

    // A new process (its memory empty) takes the kept frames in from the database. Once results can be stored, each
    // frame becomes one result, as the photo it was, and is released by the transaction that stores the result:
    // a crash right after that commit cannot leave the frame to be sent again.
    drop(outbox);
    let outbox =
        Outbox::open(&OutboxConfig { path: tmp.path().join("outbox.sqlite3"), ..OutboxConfig::default() }).unwrap();
    let held = HeldFrames::default();
    assert_eq!(held.attach(&outbox).await.unwrap(), 2);
    let (out, mut out_rx) = mpsc::channel::<Finished>(8);
    let run = Running::start(vec![held.source().unwrap()], cfg(), out);
    let mut results = Vec::new();
    for _ in 0..2 {
        let f = tokio::time::timeout(Duration::from_secs(60), out_rx.recv()).await.unwrap().unwrap();
        let key = *f.releases.first().expect("the result releases its kept frame");
        assert!(outbox.kept_frames().await.unwrap().iter().any(|(k, _)| *k == key));
        let msg = NewMessage {
            topic: format!("attrd/it/results/{}", f.payload.sku),
            payload: serde_json::to_value(&f.payload).unwrap(),
            qos: 1,
            retain: false,
            message_id: uuid::Uuid::now_v7(),
            covers: f.covers.clone(),
            releases: f.releases.clone(),
        };
        outbox.enqueue_many(vec![msg]).await.pop().unwrap().unwrap();
        assert!(!outbox.kept_frames().await.unwrap().iter().any(|(k, _)| *k == key), "released with the commit");
        f.durable.send(Ok(())).unwrap();
        results.push(f.payload);
    }
    results.sort_by(|a, b| a.sku.cmp(&b.sku));
    let stats = run.stop().await;
    assert_eq!(stats.durable, 2);
    assert!(held.is_empty() && held.source().is_none());
    assert!(outbox.kept_frames().await.unwrap().is_empty(), "released once stored");
    for (r, (sku, at)) in results.iter().zip(["HELD-1", "HELD-2"].into_iter().zip(captured)) {
        assert_eq!(r.sku, sku);
        assert_eq!(r.source.camera.as_deref(), Some("cam-a"));
        assert_eq!(r.source.kind, SourceKind::Fake);
        assert_eq!(r.captured_at, at, "the capture time of the frame, not of its resend");
    }
}

/// A frame grabbed while the pipeline cannot take it (its intake is full) when the sources stop: kept on disk and
/// held for the next run. Before, the stop won the race and the frame, which exists nowhere else, was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_grabbed_as_the_camera_stops_is_kept_and_held_not_dropped() {
    let photo = image::open(&photos(1)[0]).unwrap().to_rgb8();
    let (cam, _ctl) = FakeCamera::new("fake0", vec![mjpeg_frame(&photo, 90).unwrap()]);
    let cam_cfg = V4l2Config { device: "/dev/fake0".into(), name: Some("cam-s".into()), ..V4l2Config::default() };
    let tmp = tempfile::tempdir().unwrap();
    let outbox =
        Outbox::open(&OutboxConfig { path: tmp.path().join("outbox.sqlite3"), ..OutboxConfig::default() }).unwrap();
    let held = HeldFrames::default();
    held.attach(&outbox).await.unwrap();
    let (trig, trig_rx) = mpsc::channel(4);
    let camera = CameraSource::new(cam_cfg, Box::new(cam), Some(trig_rx)).unwrap().holding(held.clone());
    // A pipeline whose intake is full and stays full.
    let (tx, mut intake) = mpsc::channel::<Shot>(1);
    let (filler, _) = Shot::new("FILL", vec![0], time::OffsetDateTime::now_utc(), Origin::Fake { camera: "x".into() });
    tx.send(filler).await.unwrap();
    let stop = ShutdownSignal::new();
    let task = tokio::spawn(Box::new(camera).run(tx, stop.subscribe()));
    trig.send(Trigger { sku: "STOP-1".into() }).await.unwrap();
    // Grabbed and waiting to be handed over (a fake camera grabs in well under this).
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.trigger();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("the camera stops").unwrap();
    assert_eq!(held.len(), 1, "the frame is held, not dropped");
    let kept = outbox.kept_frames().await.unwrap();
    assert_eq!(kept.iter().map(|(_, f)| f.sku.as_str()).collect::<Vec<_>>(), ["STOP-1"], "and kept on disk");
    assert_eq!(intake.recv().await.unwrap().sku, "FILL");
    assert!(intake.recv().await.is_none(), "nothing else reached the pipeline");
}

/// A camera whose grab waits until the test lets it finish, and says when it has begun.
struct GatedCamera {
    inner: FakeCamera,
    begun: std::sync::mpsc::Sender<()>,
    gate: std::sync::mpsc::Receiver<()>,
}

impl attrd::sources::FrameGrabber for GatedCamera {
    fn kind(&self) -> SourceKind {
        self.inner.kind()
    }
    fn open(
        &mut self,
        settings: &attrd::sources::v4l2::CaptureSettings,
    ) -> Result<attrd::sources::v4l2::StreamInfo, attrd::sources::v4l2::CameraError> {
        self.inner.open(settings)
    }
    fn grab(&mut self) -> Result<Frame, attrd::sources::v4l2::CameraError> {
        let _ = self.begun.send(());
        let _ = self.gate.recv();
        self.inner.grab()
    }
    fn close(&mut self) {
        self.inner.close()
    }
}

/// The other side of the stop's race: a frame that is ready only after the stop has come, while the pipeline has
/// room, goes into the pipeline (which drains what it holds before it stops) rather than being held for the next
/// run. The hand-over is biased towards the pipeline; an unbiased one would pick either at random, so the race is
/// run several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_ready_after_the_stop_goes_into_a_pipeline_with_room() {
    let photo = image::open(&photos(1)[0]).unwrap().to_rgb8();
    let frame = mjpeg_frame(&photo, 90).unwrap();
    for round in 0..8 {
        let (begun_tx, begun) = std::sync::mpsc::channel();
        let (open_gate, gate) = std::sync::mpsc::channel();
        let cam = GatedCamera { inner: FakeCamera::new("gated", vec![frame.clone()]).0, begun: begun_tx, gate };
        let cam_cfg = V4l2Config { device: "/dev/gated".into(), name: Some("cam-g".into()), ..V4l2Config::default() };
        let held = HeldFrames::default();
        let (trig, trig_rx) = mpsc::channel(4);
        let camera = CameraSource::new(cam_cfg, Box::new(cam), Some(trig_rx)).unwrap().holding(held.clone());
        let (tx, mut intake) = mpsc::channel::<Shot>(4);
        let stop = ShutdownSignal::new();
        let task = tokio::spawn(Box::new(camera).run(tx, stop.subscribe()));
        let sku = format!("ROOM-{round}");
        trig.send(Trigger { sku: sku.clone() }).await.unwrap();
        tokio::task::spawn_blocking(move || begun.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the grab began");
        stop.trigger();
        // Let the stop reach everything that watches it before the frame is ready.
        tokio::time::sleep(Duration::from_millis(50)).await;
        open_gate.send(()).unwrap();
        let shot = tokio::time::timeout(Duration::from_secs(10), intake.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: nothing reached the pipeline; held: {}", held.len()))
            .unwrap_or_else(|| panic!("round {round}: the frame was not handed over; held: {}", held.len()));
        assert_eq!(shot.sku, sku);
        let _ = shot.done.unwrap().send(attrd::sources::ShotOutcome::Durable);
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("the camera stops").unwrap();
        assert!(held.is_empty(), "round {round}: a frame the pipeline took is held too");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_folder_and_an_interval_camera_run_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let p = photos(3);
    std::fs::copy(&p[0], hot.join("HF_1.jpg")).unwrap();
    let cfgs = vec![
        SourceConfig::Hotfolder(hot_cfg(&hot)),
        SourceConfig::V4l2(V4l2Config {
            device: "/dev/video7".into(),
            interval: Some(Duration::from_millis(300)),
            interval_sku: "{camera}-{ts}".into(),
            ..V4l2Config::default()
        }),
    ];
    // Without the `v4l2` feature a real camera is a clear start-up error naming it.
    #[cfg(not(feature = "v4l2"))]
    match build(&cfgs, &HeldFrames::default(), None) {
        Err(e @ SourceError::V4l2Unavailable { .. }) => assert!(e.to_string().contains("/dev/video7"), "{e}"),
        other => panic!("{other:?}"),
    }
    let photo = image::open(&p[1]).unwrap().to_rgb8();
    let built = build_with(&cfgs, &HeldFrames::default(), None, |_| {
        Ok(Box::new(FakeCamera::new("video7", vec![mjpeg_frame(&photo, 85).unwrap()]).0)
            as Box<dyn attrd::sources::FrameGrabber>)
    })
    .unwrap();
    assert_eq!(built.triggers.keys().collect::<Vec<_>>(), ["video7"]);
    let trig = built.triggers["video7"].clone();
    let (out, out_rx) = mpsc::channel(8);
    let consumer = ack_all(out_rx);
    let run = Running::start(built.sources, cfg(), out);
    trig.send(Trigger { sku: "TRIGGERED".into() }).await.unwrap();
    let stats = run.pipeline.stats.clone();
    assert!(eventually(Duration::from_secs(60), || stats.snapshot().durable >= 4).await, "{:?}", stats.snapshot());
    run.stop().await;
    let got = consumer.await.unwrap();
    assert!(got.iter().any(|r| r.sku == "HF" && r.source.kind == SourceKind::Hotfolder));
    assert!(got.iter().any(|r| r.sku == "TRIGGERED" && r.source.camera.as_deref() == Some("video7")));
    assert!(got.iter().filter(|r| r.sku.starts_with("video7-")).count() >= 2, "interval frames");
    assert!(hot.join("done/HF_1.jpg").is_file());
    // Duplicate names are refused.
    let dup = vec![SourceConfig::Hotfolder(hot_cfg(&hot)), SourceConfig::Hotfolder(hot_cfg(&hot))];
    assert!(matches!(build(&dup, &HeldFrames::default(), None), Err(SourceError::DuplicateName(_))));
}

/// Several cameras on one box: one trigger for a SKU fires every camera, and with a fusion window their shots
/// become one SKU-level result with a view per camera.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cameras_triggered_together_are_fused_into_one_result() {
    let p = photos(2);
    let front = image::open(&p[0]).unwrap().to_rgb8();
    let side = image::open(&p[1]).unwrap().to_rgb8();
    let cam = |dev: &str| SourceConfig::V4l2(V4l2Config { device: dev.into(), name: None, ..V4l2Config::default() });
    let cfgs = vec![cam("/dev/video0"), cam("/dev/video2")];
    let built = build_with(&cfgs, &HeldFrames::default(), None, |c| {
        let (id, frame) = match c.device.to_string_lossy().as_ref() {
            "/dev/video0" => ("video0", mjpeg_frame(&front, 90).unwrap()),
            _ => ("video2", rgb_to_yuyv(&side)),
        };
        Ok(Box::new(FakeCamera::new(id, vec![frame]).0) as Box<dyn attrd::sources::FrameGrabber>)
    })
    .unwrap();
    assert_eq!(built.triggers.keys().collect::<Vec<_>>(), ["video0", "video2"]);
    let (out, out_rx) = mpsc::channel(8);
    let consumer = ack_all(out_rx);
    let pcfg = PipelineConfig { fusion_window: Duration::from_secs(2), ..cfg() };
    let run = Running::start(built.sources, pcfg, out);
    for t in built.triggers.values() {
        t.send(Trigger { sku: "TWO-CAM".into() }).await.unwrap();
    }
    let stats = run.pipeline.stats.clone();
    assert!(eventually(Duration::from_secs(60), || stats.snapshot().durable >= 1).await, "{:?}", stats.snapshot());
    run.stop().await;
    let got = consumer.await.unwrap();
    assert_eq!(got.len(), 1, "one fused result: {got:#?}");
    let r = &got[0];
    assert_eq!(r.sku, "TWO-CAM");
    let mut cams: Vec<Option<String>> = r.views.iter().map(|v| v.source.camera.clone()).collect();
    cams.sort();
    assert_eq!(cams, [Some("video0".to_string()), Some("video2".to_string())], "{r:#?}");
}

/// A crash between a fused result's commit and its files' moves leaves some of the files in the hot folder. The
/// outbox recorded which files (in which version) the result covers, in the same transaction, so the next start files
/// them to `done/` without processing them again: a second, partial result with another `message_id` never appears.
/// A file that was replaced under the same name since, and a new file, are processed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_crash_left_after_their_fused_result_was_stored_are_filed_not_processed_again() {
    let tmp = tempfile::tempdir().unwrap();
    let hot = tmp.path().join("in");
    std::fs::create_dir(&hot).unwrap();
    let p = photos(4);
    for (i, name) in ["LEFT_front.jpg", "LEFT_side.jpg", "LEFT_back.jpg"].iter().enumerate() {
        std::fs::copy(&p[i], hot.join(name)).unwrap();
    }
    let outbox =
        Outbox::open(&OutboxConfig { path: tmp.path().join("outbox.sqlite3"), ..OutboxConfig::default() }).unwrap();
    let fused = PipelineConfig { fusion_window: Duration::from_secs(2), ..cfg() };

    // The first process stores the fused result with the files it covers, as the daemon's outbox writer does, and
    // "crashes" before any file is moved: the sources never hear that it is durable.
    let (out, mut out_rx) = mpsc::channel::<Finished>(8);
    let src = HotfolderSource::new(hot_cfg(&hot)).unwrap().with_outbox(outbox.clone());
    let run = Running::start(vec![Box::new(src)], fused.clone(), out);
    let f = tokio::time::timeout(Duration::from_secs(60), out_rx.recv()).await.unwrap().unwrap();
    assert_eq!(f.payload.views.len(), 3, "one result for the three photos");
    assert_eq!(f.covers.len(), 3);
    let msg = NewMessage {
        topic: "attrd/it/results/LEFT".into(),
        payload: serde_json::to_value(&f.payload).unwrap(),
        qos: 1,
        retain: false,
        message_id: uuid::Uuid::from_u128(7),
        covers: f.covers.clone(),
        releases: f.releases.clone(),
    };
    outbox.enqueue_many(vec![msg]).await.pop().unwrap().unwrap();
    drop(f);
    run.stop().await;
    assert_eq!(names(&hot).iter().filter(|n| n.starts_with("LEFT")).count(), 3, "{:?}", names(&hot));

    // Before the next start, the back photo is exported again under the same name, and a new photo arrives.
    std::fs::remove_file(hot.join("LEFT_back.jpg")).unwrap();
    std::fs::copy(&p[2], hot.join("LEFT_back.jpg")).unwrap();
    std::fs::copy(&p[3], hot.join("NEW_front.jpg")).unwrap();
    let (out, out_rx) = mpsc::channel::<Finished>(8);
    let consumer = ack_all(out_rx);
    let src = HotfolderSource::new(hot_cfg(&hot)).unwrap().with_outbox(outbox.clone());
    let run = Running::start(vec![Box::new(src)], fused, out);
    let done = hot.join("done");
    assert!(
        eventually(Duration::from_secs(60), || names(&done).len() == 4).await,
        "done/ has {:?}, the folder {:?}",
        names(&done),
        names(&hot)
    );
    run.stop().await;
    let got = consumer.await.unwrap();
    let mut results: Vec<(String, usize)> = got.iter().map(|r| (r.sku.clone(), r.views.len().max(1))).collect();
    results.sort();
    assert_eq!(results, [("LEFT".to_string(), 1), ("NEW".to_string(), 1)], "only the replaced and the new photo");
    let left = got.iter().find(|r| r.sku == "LEFT").unwrap();
    assert!(left.source.path.as_deref().unwrap().ends_with("LEFT_back.jpg"), "{left:#?}");
    assert_eq!(names(&done), ["LEFT_back.jpg", "LEFT_front.jpg", "LEFT_side.jpg", "NEW_front.jpg"]);
}
