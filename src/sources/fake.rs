//! A camera that serves recorded frames, for tests and demos without hardware. It can be "unplugged" and
//! "replugged" through its [`FakeControl`] to exercise the reopen path.

use super::v4l2::{CameraError, CaptureSettings, Frame, FrameGrabber, PixelFormat, StreamInfo, encode_jpeg};
use crate::payload::SourceKind;
use image::RgbImage;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Serves its frames in a loop, like a camera looking at a turntable.
#[derive(Debug)]
pub struct FakeCamera {
    name: String,
    frames: Vec<Frame>,
    next: usize,
    open: bool,
    ctl: FakeControl,
}

/// Remote control of a [`FakeCamera`] (clone it before handing the camera over).
#[derive(Debug, Clone)]
pub struct FakeControl {
    plugged: Arc<AtomicBool>,
    opens: Arc<AtomicUsize>,
    grabs: Arc<AtomicUsize>,
}

impl FakeControl {
    pub fn unplug(&self) {
        self.plugged.store(false, Ordering::SeqCst);
    }
    pub fn plug(&self) {
        self.plugged.store(true, Ordering::SeqCst);
    }
    /// Successful opens so far.
    pub fn opens(&self) -> usize {
        self.opens.load(Ordering::SeqCst)
    }
    /// Frames served so far.
    pub fn grabs(&self) -> usize {
        self.grabs.load(Ordering::SeqCst)
    }
}

impl FakeCamera {
    /// A plugged-in camera serving `frames` (at least one) in order, round and round.
    pub fn new(name: impl Into<String>, frames: Vec<Frame>) -> (Self, FakeControl) {
        let ctl = FakeControl {
            plugged: Arc::new(AtomicBool::new(true)),
            opens: Arc::new(AtomicUsize::new(0)),
            grabs: Arc::new(AtomicUsize::new(0)),
        };
        (FakeCamera { name: name.into(), frames, next: 0, open: false, ctl: ctl.clone() }, ctl)
    }

    fn gone(&self) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, "No such device")
    }
}

impl FrameGrabber for FakeCamera {
    fn kind(&self) -> SourceKind {
        SourceKind::Fake
    }

    fn open(&mut self, _settings: &CaptureSettings) -> Result<StreamInfo, CameraError> {
        if !self.ctl.plugged.load(Ordering::SeqCst) {
            return Err(CameraError::Open { device: self.name.clone(), source: self.gone() });
        }
        let Some(first) = self.frames.first() else {
            return Err(CameraError::Unsupported { device: self.name.clone(), reason: "no recorded frames".into() });
        };
        self.open = true;
        self.ctl.opens.fetch_add(1, Ordering::SeqCst);
        // Like a real camera, it reports the mode it has, whatever was asked for.
        Ok(StreamInfo { format: first.format, width: first.width, height: first.height })
    }

    fn grab(&mut self) -> Result<Frame, CameraError> {
        if !self.ctl.plugged.load(Ordering::SeqCst) {
            self.open = false;
            return Err(CameraError::Grab { device: self.name.clone(), source: self.gone() });
        }
        if !self.open || self.frames.is_empty() {
            return Err(CameraError::Grab {
                device: self.name.clone(),
                source: io::Error::new(io::ErrorKind::NotConnected, "not streaming"),
            });
        }
        let f = self.frames[self.next % self.frames.len()].clone();
        self.next += 1;
        self.ctl.grabs.fetch_add(1, Ordering::SeqCst);
        Ok(f)
    }

    fn close(&mut self) {
        self.open = false;
    }
}

/// RGB to BT.601 limited-range YUYV, chroma averaged over each pixel pair (what a UVC camera sends). Odd widths
/// repeat the last pixel into the final pair.
pub fn rgb_to_yuyv(img: &RgbImage) -> Frame {
    let (w, h) = img.dimensions();
    let pairs = w.div_ceil(2);
    let mut data = Vec::with_capacity(pairs as usize * 4 * h as usize);
    for y in 0..h {
        for p in 0..pairs {
            let a = img.get_pixel(2 * p, y).0;
            let b = img.get_pixel((2 * p + 1).min(w - 1), y).0;
            let (ya, ua, va) = rgb_to_ycbcr(a);
            let (yb, ub, vb) = rgb_to_ycbcr(b);
            data.extend_from_slice(&[ya, (ua + ub).div_ceil(2) as u8, yb, (va + vb).div_ceil(2) as u8]);
        }
    }
    Frame { format: PixelFormat::Yuyv, width: w, height: h, stride: 0, data }
}

fn rgb_to_ycbcr([r, g, b]: [u8; 3]) -> (u8, u16, u16) {
    let (r, g, b) = (i32::from(r), i32::from(g), i32::from(b));
    let y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    (y.clamp(0, 255) as u8, u.clamp(0, 255) as u16, v.clamp(0, 255) as u16)
}

/// An MJPEG frame of `img` (JPEG at `quality`).
pub fn mjpeg_frame(img: &RgbImage, quality: u8) -> Result<Frame, super::v4l2::FrameError> {
    Ok(Frame {
        format: PixelFormat::Mjpeg,
        width: img.width(),
        height: img.height(),
        stride: 0,
        data: encode_jpeg(img, quality)?,
    })
}
