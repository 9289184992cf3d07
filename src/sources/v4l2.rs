//! Cameras: a stream kept open ("warm"), a frame taken on a trigger or on an interval.
//!
//! The device itself sits behind [`FrameGrabber`]: the V4L2 binding (`v4l` crate, `v4l2` cargo feature, which
//! needs libclang at build time) or [`FakeCamera`](super::fake::FakeCamera), which serves recorded frames. What is
//! common lives here and is tested without hardware: turning MJPEG/YUYV frames into JPEG shots, trigger and
//! interval handling, and reopening a camera that failed or was unplugged (with backoff, never a crash).

use super::{Origin, Shot, ShotOutcome, Shutdown, Source, SourceError, SourceFuture, backoff, error_chain, outcome};
use crate::outbox::{KeptFrame, Outbox, OutboxError};
use crate::payload::SourceKind;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};

/// Pixel formats attrd can capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Motion JPEG: every frame is a JPEG already (most USB cameras at high resolution).
    Mjpeg,
    /// YUV 4:2:2 packed as Y0 U Y1 V; converted to RGB and encoded as JPEG here.
    Yuyv,
}

/// Configuration of one V4L2 camera.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct V4l2Config {
    /// Device node. Default `/dev/video0`; prefer a stable `/dev/v4l/by-id/…` link on a box with several cameras.
    pub device: PathBuf,
    /// Camera id in payloads, logs and trigger routing; default the device's file name (`video0`). Must be unique
    /// among sources.
    pub name: Option<String>,
    /// Pixel format to request. Default `mjpeg`.
    pub format: PixelFormat,
    /// Frame width to request, in pixels; the driver may pick the nearest mode it has. Default 1920.
    pub width: u32,
    /// Frame height to request, in pixels. Default 1080.
    pub height: u32,
    /// Frame rate to request. Default 30.
    pub fps: u32,
    /// Manual exposure in units of 100 µs (V4L2's `exposure_time_absolute`); unset (default) leaves auto exposure.
    pub exposure: Option<u32>,
    /// JPEG quality (1–100) for frames that arrive uncompressed (YUYV). Default 92.
    pub jpeg_quality: u8,
    /// Also take a frame this often without a trigger; unset (default): only on trigger.
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// SKU of interval frames: `{camera}` and `{ts}` (Unix time in ms) are replaced. Default `{camera}-{ts}`.
    pub interval_sku: String,
    /// First wait before reopening a camera that failed; doubles per failure. Default 500ms.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest wait between reopen attempts, and between resends of a frame whose result could not be stored.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Frames waiting for a durable result before the camera stops taking new ones (triggers then wait). Default 8.
    pub max_in_flight: usize,
    /// Instead of opening `device`, replay the JPEG files of this directory (in name order, round and round) as the
    /// camera's frames: a camera simulator for demos and for testing trigger integrations without hardware.
    /// Results say `source.type = "fake"`. Unset (default): a real camera.
    pub replay: Option<PathBuf>,
}

impl Default for V4l2Config {
    fn default() -> Self {
        V4l2Config {
            device: PathBuf::from("/dev/video0"),
            name: None,
            format: PixelFormat::Mjpeg,
            width: 1920,
            height: 1080,
            fps: 30,
            exposure: None,
            jpeg_quality: 92,
            interval: None,
            interval_sku: "{camera}-{ts}".to_string(),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            max_in_flight: 8,
            replay: None,
        }
    }
}

impl V4l2Config {
    pub fn camera_id(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "camera".into())
        })
    }

    pub fn settings(&self) -> CaptureSettings {
        CaptureSettings {
            format: self.format,
            width: self.width,
            height: self.height,
            fps: self.fps,
            exposure: self.exposure,
        }
    }
}

/// Take a frame now, for this SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub sku: String,
}

/// What to ask the device for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureSettings {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub exposure: Option<u32>,
}

/// What the device agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes per row for YUYV (drivers may pad rows); 0 means tightly packed (`2 * width`, rounded up to pairs).
    pub stride: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("YUYV frame {width}x{height} (stride {stride}) needs {expected} bytes, got {got}")]
    Short { width: u32, height: u32, stride: u32, expected: usize, got: usize },
    #[error("frame has no pixels ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error("MJPEG frame does not start with a JPEG SOI marker")]
    NotJpeg,
    #[error("cannot encode the frame as JPEG")]
    Encode(#[source] image::ImageError),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CameraError {
    #[error("camera {device}: cannot open")]
    Open {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("camera {device}: {reason}")]
    Unsupported { device: String, reason: String },
    #[error("camera {device}: cannot capture")]
    Grab {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("camera {device}: bad frame")]
    Frame {
        device: String,
        #[source]
        source: FrameError,
    },
}

/// A camera device. Calls block (they are made on blocking threads); `open` starts streaming and the stream stays
/// open between `grab`s, which return the newest frame.
pub trait FrameGrabber: Send + 'static {
    /// `V4l2` for real devices, `Fake` for recorded frames; goes into the payload's `source.type`.
    fn kind(&self) -> SourceKind;
    fn open(&mut self, settings: &CaptureSettings) -> Result<StreamInfo, CameraError>;
    fn grab(&mut self) -> Result<Frame, CameraError>;
    /// Stops streaming and releases the device; `open` may be called again.
    fn close(&mut self);
}

/// BT.601 limited-range YUYV (what UVC cameras send) to RGB.
pub fn yuyv_to_rgb(data: &[u8], width: u32, height: u32, stride: u32) -> Result<RgbImage, FrameError> {
    if width == 0 || height == 0 {
        return Err(FrameError::Empty { width, height });
    }
    let pairs = (width as usize).div_ceil(2);
    let packed = pairs * 4;
    let stride = if stride == 0 { packed } else { stride as usize };
    let expected = stride.max(packed) * (height as usize - 1) + packed;
    if stride < packed || data.len() < expected {
        return Err(FrameError::Short { width, height, stride: stride as u32, expected, got: data.len() });
    }
    let mut out = vec![0u8; width as usize * height as usize * 3];
    let w = width as usize;
    for (y, dst) in out.chunks_exact_mut(w * 3).enumerate() {
        let row = &data[y * stride..y * stride + packed];
        for (x, px) in dst.chunks_exact_mut(3).enumerate() {
            let quad = &row[(x / 2) * 4..(x / 2) * 4 + 4];
            let luma = if x % 2 == 0 { quad[0] } else { quad[2] };
            px.copy_from_slice(&ycbcr_to_rgb(luma, quad[1], quad[3]));
        }
    }
    // Invariant: `out` holds exactly width * height * 3 bytes.
    Ok(RgbImage::from_raw(width, height, out).expect("buffer sized for the image"))
}

/// ITU-R BT.601, limited range, in 8.8 fixed point (the usual integer form).
fn ycbcr_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = 298 * (i32::from(y) - 16);
    let d = i32::from(u) - 128;
    let e = i32::from(v) - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [clamp(c + 409 * e), clamp(c - 100 * d - 208 * e), clamp(c + 516 * d)]
}

pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
        .encode_image(img)
        .map_err(FrameError::Encode)?;
    Ok(out)
}

/// The encoded image for a frame: MJPEG frames as they are (decoders fill in the Huffman tables many cameras
/// leave out), YUYV converted and encoded at `quality`.
pub fn frame_to_jpeg(frame: &Frame, quality: u8) -> Result<Vec<u8>, FrameError> {
    match frame.format {
        PixelFormat::Mjpeg => {
            if !frame.data.starts_with(&[0xFF, 0xD8]) {
                return Err(FrameError::NotJpeg);
            }
            Ok(frame.data.clone())
        }
        PixelFormat::Yuyv => encode_jpeg(&yuyv_to_rgb(&frame.data, frame.width, frame.height, frame.stride)?, quality),
    }
}

/// The grabber for a configured camera: a replay of recorded frames when `replay` is set, else the device.
pub fn grabber(cfg: &V4l2Config) -> Result<Box<dyn FrameGrabber>, SourceError> {
    match &cfg.replay {
        Some(dir) => replay_grabber(cfg, dir),
        None => device_grabber(cfg),
    }
}

fn replay_grabber(cfg: &V4l2Config, dir: &std::path::Path) -> Result<Box<dyn FrameGrabber>, SourceError> {
    let bad = |reason: String| SourceError::Config { source_name: cfg.camera_id(), reason };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(format!("replay directory {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg")))
        .collect();
    files.sort();
    let mut frames = Vec::with_capacity(files.len());
    for f in files {
        let data = std::fs::read(&f).map_err(|e| bad(format!("{}: {e}", f.display())))?;
        let (width, height) = image::ImageReader::with_format(std::io::Cursor::new(&data), image::ImageFormat::Jpeg)
            .into_dimensions()
            .map_err(|e| bad(format!("{}: not a readable JPEG: {e}", f.display())))?;
        frames.push(Frame { format: PixelFormat::Mjpeg, width, height, stride: 0, data });
    }
    if frames.is_empty() {
        return Err(bad(format!("replay directory {} has no .jpg files", dir.display())));
    }
    tracing::info!(camera = %cfg.camera_id(), dir = %dir.display(), frames = frames.len(), "replaying recorded frames");
    Ok(Box::new(super::fake::FakeCamera::new(cfg.camera_id(), frames).0))
}

/// The grabber for a configured V4L2 device.
#[cfg(feature = "v4l2")]
pub fn device_grabber(cfg: &V4l2Config) -> Result<Box<dyn FrameGrabber>, SourceError> {
    Ok(Box::new(device::V4l2Grabber::new(cfg.device.clone())))
}

/// Without the `v4l2` feature there is no device binding: configuring a camera is an error at start-up.
#[cfg(not(feature = "v4l2"))]
pub fn device_grabber(cfg: &V4l2Config) -> Result<Box<dyn FrameGrabber>, SourceError> {
    Err(SourceError::V4l2Unavailable { camera: cfg.camera_id(), device: cfg.device.clone() })
}

/// A camera source: one grabber, triggers from the API, optionally an interval.
pub struct CameraSource {
    cfg: V4l2Config,
    id: String,
    grabber: Box<dyn FrameGrabber>,
    trigger: Option<mpsc::Receiver<Trigger>>,
    held: HeldFrames,
}

impl std::fmt::Debug for CameraSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraSource").field("id", &self.id).field("device", &self.cfg.device).finish()
    }
}

impl CameraSource {
    pub fn new(
        cfg: V4l2Config,
        grabber: Box<dyn FrameGrabber>,
        trigger: Option<mpsc::Receiver<Trigger>>,
    ) -> Result<Self, SourceError> {
        let id = cfg.camera_id();
        let bad = |reason: &str| Err(SourceError::Config { source_name: id.clone(), reason: reason.to_string() });
        if cfg.width == 0 || cfg.height == 0 || cfg.fps == 0 {
            return bad("width, height and fps must be positive");
        }
        if !(1..=100).contains(&cfg.jpeg_quality) {
            return bad("jpeg_quality must be within 1..=100");
        }
        if cfg.max_in_flight == 0 || cfg.retry_min.is_zero() || cfg.retry_max < cfg.retry_min {
            return bad("max_in_flight and retry_min must be positive, retry_max at least retry_min");
        }
        if cfg.interval.is_some_and(|d| d.is_zero()) {
            return bad("interval must be positive (leave it unset for trigger-only)");
        }
        if trigger.is_none() && cfg.interval.is_none() {
            return bad("neither a trigger channel nor an interval: the camera would never take a frame");
        }
        Ok(CameraSource { cfg, id, grabber, trigger, held: HeldFrames::default() })
    }

    /// Where this camera leaves frames whose results are not stored yet when it stops (see [`HeldFrames`]); by
    /// default a store of its own, which nothing reads.
    pub fn holding(mut self, held: HeldFrames) -> Self {
        self.held = held;
        self
    }

    fn interval_sku(&self) -> String {
        let ts = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).to_string();
        self.cfg.interval_sku.replace("{camera}", &self.id).replace("{ts}", &ts)
    }
}

enum Wake {
    Trigger(Trigger),
    Interval,
    Stop,
    Again,
}

impl Source for CameraSource {
    fn name(&self) -> &str {
        &self.id
    }

    fn run(self: Box<Self>, tx: mpsc::Sender<Shot>, shutdown: Shutdown) -> SourceFuture {
        Box::pin(self.run_camera(tx, shutdown))
    }
}

/// How often one trigger is tried again when its frames are unusable, before it is given up.
const BAD_FRAME_TRIES: u32 = 3;

impl CameraSource {
    async fn run_camera(mut self: Box<Self>, tx: mpsc::Sender<Shot>, mut shutdown: Shutdown) {
        let device = self.cfg.device.display().to_string();
        let settings = self.cfg.settings();
        let kind = self.grabber.kind();
        let in_flight = Arc::new(Semaphore::new(self.cfg.max_in_flight));
        let mut waiters = tokio::task::JoinSet::new();
        let mut ticker = self.cfg.interval.map(|d| {
            let mut t = tokio::time::interval(d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut trigger = self.trigger.take();
        let placeholder: Box<dyn FrameGrabber> = Box::new(Unplugged);
        let mut grabber = Some(std::mem::replace(&mut self.grabber, placeholder));
        let mut open = false;
        let mut failures = 0u32;
        let mut pending: Option<(Trigger, u32)> = None;
        loop {
            if shutdown.is_triggered() {
                break;
            }
            if !open {
                let Some(g) = grabber.take() else { break };
                let (g, res) = blocking(g, move |g| g.open(&settings)).await;
                grabber = g;
                match res {
                    Some(Ok(info)) => {
                        open = true;
                        failures = 0;
                        tracing::info!(
                            camera = %self.id, %device, format = ?info.format, width = info.width,
                            height = info.height, "camera streaming"
                        );
                        // Recorded frames have whatever size they were recorded at; only a real camera is "wrong".
                        if self.cfg.replay.is_none()
                            && (info.width, info.height, info.format)
                                != (settings.width, settings.height, settings.format)
                        {
                            tracing::warn!(camera = %self.id, requested = ?settings, got = ?info, "camera picked another mode");
                        }
                    }
                    Some(Err(e)) => {
                        let wait = backoff(self.cfg.retry_min, self.cfg.retry_max, failures);
                        failures = failures.saturating_add(1);
                        tracing::error!(camera = %self.id, %device, error = %error_chain(&e), retry_in = ?wait, "camera unavailable");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.wait() => break,
                        }
                    }
                    None => break,
                }
                continue;
            }
            let (sku, tries) = match pending.take() {
                Some((t, n)) => (t.sku, n),
                None => {
                    let wake = tokio::select! {
                        _ = shutdown.wait() => Wake::Stop,
                        t = next_trigger(&mut trigger) => match t {
                            Some(t) => Wake::Trigger(t),
                            None => { trigger = None; Wake::Again }
                        },
                        _ = next_tick(&mut ticker) => Wake::Interval,
                        Some(_) = waiters.join_next(), if !waiters.is_empty() => Wake::Again,
                    };
                    match wake {
                        Wake::Stop => break,
                        Wake::Again => {
                            if trigger.is_none() && ticker.is_none() {
                                // Nothing can wake the camera any more: wait for shutdown.
                                shutdown.wait().await;
                                break;
                            }
                            continue;
                        }
                        Wake::Trigger(t) => (t.sku, 0),
                        Wake::Interval => (self.interval_sku(), 0),
                    }
                }
            };
            let permit = tokio::select! {
                p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.wait() => {
                    pending = Some((Trigger { sku }, tries));
                    break;
                }
            };
            let quality = self.cfg.jpeg_quality;
            let Some(g) = grabber.take() else { break };
            let dev = device.clone();
            let (g, res) = blocking(g, move |g| {
                let frame = g.grab()?;
                frame_to_jpeg(&frame, quality).map_err(|source| CameraError::Frame { device: dev, source })
            })
            .await;
            grabber = g;
            let jpeg = match res {
                Some(Ok(j)) => j,
                Some(Err(CameraError::Frame { source, .. })) => {
                    tracing::warn!(camera = %self.id, %device, %sku, error = %error_chain(&source), "unusable frame");
                    if tries + 1 < BAD_FRAME_TRIES {
                        pending = Some((Trigger { sku }, tries + 1));
                    } else {
                        tracing::error!(camera = %self.id, %sku, "giving up on this trigger: no usable frame");
                    }
                    continue;
                }
                Some(Err(e)) => {
                    tracing::error!(camera = %self.id, %device, %sku, error = %error_chain(&e), "camera lost; reopening");
                    if let Some(g) = grabber.as_mut() {
                        g.close();
                    }
                    open = false;
                    // The item is presumably still in front of the camera: take it once the camera is back.
                    pending = Some((Trigger { sku }, tries));
                    continue;
                }
                None => break,
            };
            let frame = HeldFrame {
                frame: KeptFrame {
                    camera: self.id.clone(),
                    sku: sku.clone(),
                    jpeg,
                    captured_at: OffsetDateTime::now_utc(),
                    // A fake camera's frames are recorded ones; `HeldFrame::shot` names their origin from this.
                    replayed: matches!(kind, SourceKind::Fake),
                    retry_min: self.cfg.retry_min,
                    retry_max: self.cfg.retry_max,
                },
                key: None,
            };
            let bytes = frame.frame.jpeg.len();
            let mut resend = Resend { frame, tx: tx.clone(), shutdown: shutdown.clone(), held: self.held.clone() };
            let Some(rx) = resend.send().await else {
                // The sources stop (or the pipeline is gone) before the frame got into the pipeline. It exists
                // nowhere else: kept on disk for a stop, held in memory for a reload, like a frame not stored yet.
                if tx.is_closed() {
                    tracing::error!(camera = %self.id, "the pipeline is gone; camera stops");
                }
                resend.keep(0).await;
                resend.hold();
                break;
            };
            tracing::debug!(camera = %self.id, %sku, bytes, "frame sent");
            waiters.spawn(async move {
                resend.until_stored(rx).await;
                drop(permit);
            });
        }
        // Capture requests already answered (a 202 from /v1/capture, an MQTT reply) but not carried out: no frame
        // exists for them, so all that can be done is to name them.
        let mut not_taken: Vec<String> = pending.into_iter().map(|(t, _)| t.sku).collect();
        if let Some(rx) = trigger.as_mut() {
            rx.close();
            while let Ok(t) = rx.try_recv() {
                not_taken.push(t.sku);
            }
        }
        if !not_taken.is_empty() {
            tracing::warn!(camera = %self.id, skus = ?not_taken,
                "camera stopping with capture requests not carried out: trigger them again");
        }
        if let Some(mut g) = grabber
            && open
        {
            let _ = tokio::task::spawn_blocking(move || g.close()).await;
        }
        drop(tx);
        while waiters.join_next().await.is_some() {}
        tracing::info!(camera = %self.id, "camera stopped");
    }
}

/// A camera frame whose result is not stored yet.
#[derive(Debug, Clone)]
pub struct HeldFrame {
    frame: KeptFrame,
    /// Its key in the outbox database once kept there (see [`HeldFrames::attach`]).
    key: Option<i64>,
}

impl HeldFrame {
    pub fn sku(&self) -> &str {
        &self.frame.sku
    }

    /// Whether it is kept in the outbox database (and so outlives the process).
    pub fn is_kept(&self) -> bool {
        self.key.is_some()
    }

    fn shot(&self) -> (Shot, tokio::sync::oneshot::Receiver<ShotOutcome>) {
        let f = &self.frame;
        let camera = f.camera.clone();
        let origin = if f.replayed { Origin::Fake { camera } } else { Origin::V4l2 { camera } };
        let (mut shot, rx) = Shot::new(f.sku.clone(), f.jpeg.clone(), f.captured_at, origin);
        shot.kept_frame = self.key;
        (shot, rx)
    }
}

/// Camera frames whose results could not be stored yet (outbox full or unwritable). Unlike a hot-folder file, which
/// stays in its folder, or an upload, whose client is told to send it again, a frame exists nowhere else. So:
/// - once refused, a frame is kept in the outbox database ([`Outbox::keep_frame`]) when one is attached, and released
///   once its result is stored: a restart or a crash does not lose it, and the next start sends it again;
/// - frames still waiting when the sources stop are held here, in memory, and the daemon keeps one `HeldFrames` across
///   reloads, so a SIGHUP that restarts the pipeline hands them to the next run ([`HeldFrames::source`]).
///
/// A frame that cannot be kept either (the disk is full) stays in memory only and is lost if the process ends.
#[derive(Debug, Clone, Default)]
pub struct HeldFrames(Arc<HeldInner>);

#[derive(Debug, Default)]
struct HeldInner {
    frames: std::sync::Mutex<Vec<HeldFrame>>,
    store: std::sync::Mutex<Store>,
}

/// Where held frames are kept. The path outlives [`HeldFrames::detach`]: a reload closes the outbox and opens the
/// same file again, and its frames' keys must stay valid, or they would be taken in a second time.
#[derive(Debug, Default)]
struct Store {
    outbox: Option<Outbox>,
    last_path: Option<PathBuf>,
}

/// Locks a mutex whose data no panic can leave half-changed (a push, a take, a swap), so a poisoned lock is still whole.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl HeldFrames {
    /// Keeps frames in `outbox` from now on, and takes in the frames it holds from an earlier process (those not held
    /// in memory already). Frames held in memory but kept in another database (the outbox moved in a reload) are
    /// kept again in this one when next refused. Returns how many frames it took in.
    ///
    /// Frames are kept in `outbox` from now on even when reading the ones it holds fails (that error is returned):
    /// those stay in the database for the next start, and new refusals are not left in memory only.
    pub async fn attach(&self, outbox: &Outbox) -> Result<usize, OutboxError> {
        let kept = outbox.kept_frames().await;
        let same = {
            let mut store = lock(&self.0.store);
            store.outbox = Some(outbox.clone());
            store.last_path.replace(outbox.path().to_path_buf()).as_deref() == Some(outbox.path())
        };
        let mut frames = lock(&self.0.frames);
        if !same {
            for f in frames.iter_mut() {
                f.key = None;
            }
        }
        let kept = kept?;
        let known: std::collections::BTreeSet<i64> = frames.iter().filter_map(|f| f.key).collect();
        let mut taken = 0;
        for (key, mut frame) in kept {
            if known.contains(&key) {
                continue;
            }
            // A damaged row must not make a frame retry in a tight loop.
            frame.retry_min = frame.retry_min.max(Duration::from_millis(10));
            frame.retry_max = frame.retry_max.max(frame.retry_min);
            frames.push(HeldFrame { frame, key: Some(key) });
            taken += 1;
        }
        Ok(taken)
    }

    /// Lets go of the outbox (the daemon closes it before it opens it again in a reload).
    pub fn detach(&self) {
        lock(&self.0.store).outbox.take();
    }

    fn store(&self) -> Option<Outbox> {
        lock(&self.0.store).outbox.clone()
    }

    fn hold(&self, frame: HeldFrame) {
        lock(&self.0.frames).push(frame);
    }

    /// Takes every held frame out.
    pub fn take(&self) -> Vec<HeldFrame> {
        std::mem::take(&mut *lock(&self.0.frames))
    }

    pub fn len(&self) -> usize {
        lock(&self.0.frames).len()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.0.frames).is_empty()
    }

    /// A source that sends the held frames (taken out now) into the pipeline again, each until its result is stored;
    /// whatever is still not stored when it stops is held here again. `None` when nothing is held.
    pub fn source(&self) -> Option<Box<dyn Source>> {
        let frames = self.take();
        (!frames.is_empty()).then(|| Box::new(HeldSource { frames, held: self.clone() }) as Box<dyn Source>)
    }
}

/// The frames a previous run of the sources left, sent again ([`HeldFrames::source`]).
struct HeldSource {
    frames: Vec<HeldFrame>,
    held: HeldFrames,
}

impl Source for HeldSource {
    fn name(&self) -> &str {
        "held camera frames"
    }

    fn run(self: Box<Self>, tx: mpsc::Sender<Shot>, shutdown: Shutdown) -> SourceFuture {
        Box::pin(async move {
            tracing::info!(frames = self.frames.len(), "sending again the camera frames whose results were not stored");
            let mut waiters = tokio::task::JoinSet::new();
            for frame in self.frames {
                let resend = Resend { frame, tx: tx.clone(), shutdown: shutdown.clone(), held: self.held.clone() };
                waiters.spawn(resend.send_until_stored());
            }
            drop(tx);
            while waiters.join_next().await.is_some() {}
        })
    }
}

/// A frame waiting for its result to be stored: kept in the outbox database and sent again after "retry later",
/// held when the sources stop first, released once stored.
struct Resend {
    frame: HeldFrame,
    tx: mpsc::Sender<Shot>,
    shutdown: Shutdown,
    held: HeldFrames,
}

impl Resend {
    async fn until_stored(mut self, mut rx: tokio::sync::oneshot::Receiver<ShotOutcome>) {
        let mut attempt = 0u32;
        let (camera, sku) = (self.frame.frame.camera.clone(), self.frame.frame.sku.clone());
        loop {
            match outcome(rx).await {
                ShotOutcome::Durable => {
                    // A kept frame left the database in the transaction that stored its result (its shot carries
                    // the key from the first resend after it was kept).
                    tracing::debug!(%camera, %sku, "frame stored");
                    return;
                }
                ShotOutcome::Failed(reason) => {
                    tracing::warn!(%camera, %sku, %reason, "frame produced no result");
                    return self.release().await;
                }
                ShotOutcome::RetryLater(reason) => {
                    let wait = backoff(self.frame.frame.retry_min, self.frame.frame.retry_max, attempt);
                    tracing::warn!(%camera, %sku, %reason, retry_in = ?wait, "frame not stored yet");
                    self.keep(attempt).await;
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.wait() => return self.hold(),
                    }
                    match self.send().await {
                        Some(next) => rx = next,
                        None => return self.hold(),
                    }
                }
            }
        }
    }

    /// A held frame's first send in a new run of the sources, then [`Self::until_stored`].
    async fn send_until_stored(mut self) {
        match self.send().await {
            Some(rx) => self.until_stored(rx).await,
            None => self.hold(),
        }
    }

    /// `None` when the sources stop (or the pipeline is gone) first.
    async fn send(&mut self) -> Option<tokio::sync::oneshot::Receiver<ShotOutcome>> {
        let (shot, rx) = self.frame.shot();
        tokio::select! {
            // A frame the pipeline can take is handed over even when the stop has come too: the pipeline drains
            // what it holds before it stops.
            biased;
            r = self.tx.send(shot) => r.ok().map(|()| rx),
            _ = self.shutdown.wait() => None,
        }
    }

    /// Keeps the frame in the outbox database, if it is not kept yet and there is one; tried again on every refusal
    /// (the disk may have space again), logged on the first.
    async fn keep(&mut self, attempt: u32) {
        let Some(store) = self.held.store().filter(|_| self.frame.key.is_none()) else { return };
        let f = &self.frame.frame;
        match store.keep_frame(f.clone()).await {
            Ok(key) => {
                tracing::info!(camera = %f.camera, sku = %f.sku, key, "frame kept in the outbox database until its result is stored");
                self.frame.key = Some(key);
            }
            Err(e) if attempt == 0 => tracing::error!(camera = %f.camera, sku = %f.sku, error = %error_chain(&e),
                "cannot keep the frame on disk either: it waits in memory only, and is lost if attrd stops before its result is stored"),
            Err(_) => {}
        }
    }

    /// For a frame whose result can never be stored: nothing else will take it out of the database.
    async fn release(self) {
        let (Some(key), Some(store)) = (self.frame.key, self.held.store()) else { return };
        if let Err(e) = store.release_frame(key).await {
            // Sent again after the next start: its result repeats with the same message_id, which subscribers drop.
            tracing::warn!(camera = %self.frame.frame.camera, sku = %self.frame.frame.sku, key, error = %error_chain(&e),
                "cannot release the kept frame; it will be sent again after a restart");
        }
    }

    fn hold(self) {
        let f = &self.frame;
        tracing::warn!(camera = %f.frame.camera, sku = %f.frame.sku, kept = f.is_kept(),
            "sources stopping before the frame's result was stored: the frame is held for the next run");
        self.held.hold(self.frame);
    }
}

/// Runs `f` on the grabber on a blocking thread and hands the grabber back. `None` for the grabber means it was lost
/// in a panic; `None` for the result likewise.
async fn blocking<T: Send + 'static>(
    mut g: Box<dyn FrameGrabber>,
    f: impl FnOnce(&mut dyn FrameGrabber) -> Result<T, CameraError> + Send + 'static,
) -> (Option<Box<dyn FrameGrabber>>, Option<Result<T, CameraError>>) {
    match tokio::task::spawn_blocking(move || {
        let r = f(g.as_mut());
        (g, r)
    })
    .await
    {
        Ok((g, r)) => (Some(g), Some(r)),
        Err(e) => {
            tracing::error!(error = %e, "camera driver call panicked; camera stops");
            (None, None)
        }
    }
}

async fn next_trigger(rx: &mut Option<mpsc::Receiver<Trigger>>) -> Option<Trigger> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Stands in for the grabber while it is out on a blocking thread (and for checking a camera's settings).
pub(crate) struct Unplugged;

impl FrameGrabber for Unplugged {
    fn kind(&self) -> SourceKind {
        SourceKind::V4l2
    }
    fn open(&mut self, _: &CaptureSettings) -> Result<StreamInfo, CameraError> {
        Err(CameraError::Unsupported { device: String::new(), reason: "no grabber".into() })
    }
    fn grab(&mut self) -> Result<Frame, CameraError> {
        Err(CameraError::Unsupported { device: String::new(), reason: "no grabber".into() })
    }
    fn close(&mut self) {}
}

/// The real device binding (`v4l2` feature).
#[cfg(feature = "v4l2")]
mod device {
    use super::{CameraError, CaptureSettings, Frame, FrameGrabber, PixelFormat, StreamInfo};
    use crate::payload::SourceKind;
    use std::io;
    use std::path::PathBuf;
    use std::time::Duration;
    use v4l::FourCC;
    use v4l::buffer::Type;
    use v4l::control::{Control, Value};
    use v4l::io::traits::CaptureStream;
    use v4l::prelude::{Device, MmapStream};
    use v4l::video::Capture;
    use v4l::video::capture::Parameters;

    /// Driver buffers: enough to keep streaming while one frame is being copied out.
    const BUFFERS: u32 = 4;
    /// `poll(2)`'s POLLIN on Linux (avoids a direct libc dependency for one constant).
    const POLLIN: i16 = 0x001;
    /// V4L2_CID_EXPOSURE_AUTO and its V4L2_EXPOSURE_MANUAL value; V4L2_CID_EXPOSURE_ABSOLUTE (100 µs units).
    const CID_EXPOSURE_AUTO: u32 = 0x009a_0901;
    const EXPOSURE_MANUAL: i64 = 1;
    const CID_EXPOSURE_ABSOLUTE: u32 = 0x009a_0902;
    /// A streaming camera that delivers nothing for this long is treated as lost.
    const FRAME_TIMEOUT: Duration = Duration::from_secs(3);

    pub struct V4l2Grabber {
        path: PathBuf,
        // Field order matters: the stream (buffers mapped from the device) is dropped before the device.
        stream: Option<MmapStream<'static>>,
        dev: Option<Device>,
        info: Option<(StreamInfo, u32)>,
    }

    impl V4l2Grabber {
        pub fn new(path: PathBuf) -> Self {
            V4l2Grabber { path, stream: None, dev: None, info: None }
        }

        fn name(&self) -> String {
            self.path.display().to_string()
        }

        fn open_err(&self, source: io::Error) -> CameraError {
            CameraError::Open { device: self.name(), source }
        }
    }

    fn fourcc(f: PixelFormat) -> FourCC {
        match f {
            PixelFormat::Mjpeg => FourCC::new(b"MJPG"),
            PixelFormat::Yuyv => FourCC::new(b"YUYV"),
        }
    }

    impl FrameGrabber for V4l2Grabber {
        fn kind(&self) -> SourceKind {
            SourceKind::V4l2
        }

        fn open(&mut self, s: &CaptureSettings) -> Result<StreamInfo, CameraError> {
            self.close();
            let dev = Device::with_path(&self.path).map_err(|e| self.open_err(e))?;
            let mut fmt = dev.format().map_err(|e| self.open_err(e))?;
            fmt.width = s.width;
            fmt.height = s.height;
            fmt.fourcc = fourcc(s.format);
            let got = dev.set_format(&fmt).map_err(|e| self.open_err(e))?;
            if got.fourcc != fmt.fourcc {
                return Err(CameraError::Unsupported {
                    device: self.name(),
                    reason: format!("does not offer {} (it set {})", fmt.fourcc, got.fourcc),
                });
            }
            if let Err(e) = dev.set_params(&Parameters::with_fps(s.fps)) {
                tracing::warn!(device = %self.name(), fps = s.fps, error = %e, "cannot set the frame rate");
            }
            if let Some(exposure) = s.exposure {
                let manual = dev
                    .set_control(Control { id: CID_EXPOSURE_AUTO, value: Value::Integer(EXPOSURE_MANUAL) })
                    .and_then(|()| {
                        dev.set_control(Control { id: CID_EXPOSURE_ABSOLUTE, value: Value::Integer(exposure.into()) })
                    });
                if let Err(e) = manual {
                    tracing::warn!(device = %self.name(), exposure, error = %e, "cannot set manual exposure");
                }
            }
            let mut stream =
                MmapStream::with_buffers(&dev, Type::VideoCapture, BUFFERS).map_err(|e| self.open_err(e))?;
            stream.set_timeout(FRAME_TIMEOUT);
            // Start streaming now and prove frames arrive: the stream then stays warm for triggers.
            stream.next().map_err(|e| self.open_err(e))?;
            let info = StreamInfo { format: s.format, width: got.width, height: got.height };
            self.info = Some((info, got.stride));
            self.stream = Some(stream);
            self.dev = Some(dev);
            Ok(info)
        }

        fn grab(&mut self) -> Result<Frame, CameraError> {
            let device = self.name();
            let grab_err = |source| CameraError::Grab { device: device.clone(), source };
            let (Some(stream), Some((info, stride))) = (self.stream.as_mut(), self.info) else {
                return Err(grab_err(io::Error::new(io::ErrorKind::NotConnected, "not streaming")));
            };
            // Frames the driver filled while nobody asked are stale: skip what is queued, then take a fresh one.
            let handle = stream.handle();
            for _ in 0..BUFFERS {
                if handle.poll(POLLIN, 0).map_err(grab_err)? == 0 {
                    break;
                }
                stream.next().map_err(grab_err)?;
            }
            let (buf, meta) = stream.next().map_err(grab_err)?;
            let used = (meta.bytesused as usize).min(buf.len());
            Ok(Frame {
                format: info.format,
                width: info.width,
                height: info.height,
                stride,
                data: buf[..used].to_vec(),
            })
        }

        fn close(&mut self) {
            self.stream = None;
            self.dev = None;
            self.info = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_known_colours() {
        // BT.601 limited range: black, white, red, green, blue as cameras encode them.
        let cases = [
            ([16, 128, 128], [0, 0, 0]),
            ([235, 128, 128], [255, 255, 255]),
            ([81, 90, 240], [255, 0, 0]),
            ([145, 54, 34], [0, 255, 0]),
            ([41, 240, 110], [0, 0, 255]),
        ];
        for ([y, u, v], rgb) in cases {
            let img = yuyv_to_rgb(&[y, u, y, v], 2, 1, 0).unwrap();
            for px in img.pixels() {
                for c in 0..3 {
                    assert!((i32::from(px.0[c]) - rgb[c]).abs() <= 2, "{:?} -> {:?}, want {rgb:?}", [y, u, v], px.0);
                }
            }
        }
    }

    #[test]
    fn yuyv_honours_stride_odd_width_and_rejects_short_frames() {
        // 3x2 with rows padded to 16 bytes; the padding is garbage that must not show.
        let mut data = vec![0xAA; 16 * 2];
        for row in 0..2 {
            data[row * 16..row * 16 + 8].copy_from_slice(&[16, 128, 235, 128, 81, 90, 81, 240]);
        }
        let img = yuyv_to_rgb(&data, 3, 2, 16).unwrap();
        assert_eq!(img.get_pixel(0, 1).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 1).0, [255, 255, 255]);
        assert!(img.get_pixel(2, 0).0[0] > 250);
        assert!(matches!(yuyv_to_rgb(&data[..20], 3, 2, 16), Err(FrameError::Short { .. })));
        assert!(matches!(yuyv_to_rgb(&data, 3, 2, 4), Err(FrameError::Short { .. })));
        assert!(matches!(yuyv_to_rgb(&data, 0, 2, 0), Err(FrameError::Empty { .. })));
    }

    #[test]
    fn mjpeg_frames_must_be_jpeg() {
        let f = Frame { format: PixelFormat::Mjpeg, width: 1, height: 1, stride: 0, data: b"GIF89a".to_vec() };
        assert!(matches!(frame_to_jpeg(&f, 90), Err(FrameError::NotJpeg)));
    }

    #[cfg(feature = "v4l2")]
    #[test]
    fn a_missing_device_is_an_open_error_naming_it() {
        let mut g = device::V4l2Grabber::new("/dev/attrd-no-such-camera".into());
        let err = g.open(&V4l2Config::default().settings()).unwrap_err();
        assert!(matches!(err, CameraError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("/dev/attrd-no-such-camera"), "{err}");
        assert!(g.grab().is_err());
    }

    #[test]
    fn camera_id_defaults_to_the_device_name() {
        let c = V4l2Config::default();
        assert_eq!(c.camera_id(), "video0");
        let c: V4l2Config =
            serde_json::from_str(r#"{"device":"/dev/video2","interval":"2s","format":"yuyv"}"#).unwrap();
        assert_eq!(c.interval, Some(Duration::from_secs(2)));
        assert_eq!(c.format, PixelFormat::Yuyv);
    }
}
