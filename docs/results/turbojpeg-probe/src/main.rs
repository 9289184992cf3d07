//! Decodes one JPEG with libjpeg-turbo at 1/8 DCT scale ten times and prints the mean time per decode, then checks
//! that a file cut in half is refused rather than padded.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: turbojpeg-probe JPEG")?;
    let data = std::fs::read(path)?;
    let mut d = turbojpeg::Decompressor::new()?;
    let header = d.read_header(&data)?;
    let scale = turbojpeg::ScalingFactor::ONE_EIGHTH;
    d.set_scaling_factor(scale)?;
    let s = header.scaled(scale);
    let mut image = turbojpeg::Image {
        pixels: vec![0u8; 3 * s.width * s.height],
        width: s.width,
        pitch: 3 * s.width,
        height: s.height,
        format: turbojpeg::PixelFormat::RGB,
    };
    let started = std::time::Instant::now();
    for _ in 0..10 {
        d.decompress(&data, image.as_deref_mut())?;
    }
    println!(
        "{}x{} at 1/8 -> {}x{}: {:?} per decode",
        header.width,
        header.height,
        s.width,
        s.height,
        started.elapsed() / 10
    );
    println!("first half of the file: {:?}", d.decompress(&data[..data.len() / 2], image.as_deref_mut()).err());
    Ok(())
}
