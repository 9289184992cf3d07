#!/usr/bin/env python3
"""Regenerate the preprocessing test fixtures in tests/fixtures/images/.

Run from the repository root with the project venv (Pillow + numpy):

    .venv/bin/python scripts/make-image-fixtures.py [--data /work/shared/data/fashion/images]

Every image is derived from a real catalogue photo of the fashion dataset (60x80 JPEGs), so the tests exercise real
photographic content rather than synthetic gradients. The script is deterministic: running it twice produces the
same bytes (modulo Pillow/libjpeg/libwebp version changes), and it rewrites every file it owns.

Besides the images it writes `reference.json` plus `ref-*.npy`: output tensors computed independently with
Pillow + numpy for a few InputSpecs. The geometry below (`plan`) is the algorithm documented under "Geometry" in
`src/preprocess/mod.rs`; the resampling itself is Pillow's, which fast_image_resize reproduces.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "images"

# Dataset ids of the source photos (see /work/shared/data/fashion/labels.csv).
PHOTO = "1529"  # Ferrari tee worn by a model, grey studio background: skin, red, fine detail
SHOE = "1592"  # red football shoe: saturated colours, source of the CMYK fixture
BAG = "1599"  # green bag on grey: few colours, good for a palette PNG
CUTOUT = "1635"  # shoe on pure white: a realistic alpha cut-out

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos3": Image.Resampling.LANCZOS,
}


def write(name: str, data: bytes) -> None:
    (OUT / name).write_bytes(data)


def save(im: Image.Image, name: str, **kw) -> bytes:
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
    im.save(buf, fmt, **kw)
    write(name, buf.getvalue())
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A minimal PNG writer, for what Pillow cannot write (16-bit RGB) or refuses to (lying headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# Transpose that, applied to the upright photo, gives the stored pixels of a file tagged with this EXIF orientation
# (the inverse of what a viewer applies).
STORE_FOR_ORIENTATION = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],  # viewer rotates 90 deg clockwise, so store it rotated counter-clockwise
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


def stored_for(im: Image.Image, orientation: int) -> Image.Image:
    for t in STORE_FOR_ORIENTATION[orientation]:
        im = im.transpose(t)
    return im


def composite(rgba: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Alpha-composite over an opaque colour with the same rounding as the Rust side: round(c*a/255 + f*(1-a/255))."""
    a = np.asarray(rgba.convert("RGBA"), dtype=np.uint32)
    f = np.array(fill, dtype=np.uint32)
    alpha = a[..., 3:4]
    out = (a[..., :3] * alpha + f * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def plan(spec: dict, w: int, h: int):
    """Geometry of the resize step: (source box l,t,w,h as floats), (destination rect x,y,w,h as ints)."""
    tw, th = spec["width"], spec["height"]
    mode = spec["resize"]
    if mode == "stretch":
        return (0.0, 0.0, float(w), float(h)), (0, 0, tw, th)
    if mode == "letterbox":
        r = min(tw / w, th / h)
        cw = min(tw, max(1, math.floor(w * r + 0.5)))
        ch = min(th, max(1, math.floor(h * r + 0.5)))
        return (0.0, 0.0, float(w), float(h)), ((tw - cw) // 2, (th - ch) // 2, cw, ch)
    if mode == "center_crop":
        r = max(tw / w, th / h) / spec["crop_fraction"]
        sw, sh = tw / r, th / r
        return ((w - sw) / 2.0, (h - sh) / 2.0, sw, sh), (0, 0, tw, th)
    raise ValueError(mode)


def reference_tensor(rgb: Image.Image, spec: dict) -> np.ndarray:
    (l, t, sw, sh), (x, y, cw, ch) = plan(spec, *rgb.size)
    resized = rgb.resize((cw, ch), RESAMPLE[spec["interpolation"]], box=(l, t, l + sw, t + sh))
    canvas = Image.new("RGB", (spec["width"], spec["height"]), tuple(spec["fill"]))
    canvas.paste(resized, (x, y))
    arr = np.asarray(canvas).astype(np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    if spec["channel_order"] == "bgr":
        arr = arr[..., ::-1]
    if spec["layout"] == "nchw":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype="<f4")


def spec(**kw) -> dict:
    s = {
        "width": 32,
        "height": 32,
        "resize": "letterbox",
        "crop_fraction": 1.0,
        "interpolation": "bilinear",
        "fill": [255, 255, 255],
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "channel_order": "rgb",
        "layout": "nchw",
    }
    s.update(kw)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/fashion/images"))
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    src = lambda i: (args.data / f"{i}.jpg").read_bytes()  # noqa: E731

    # --- plain formats -------------------------------------------------------------------------------------------
    photo_jpg = src(PHOTO)
    write("photo.jpg", photo_jpg)  # the dataset file itself, byte for byte
    photo = Image.open(io.BytesIO(photo_jpg)).convert("RGB")
    save(photo, "photo.png", optimize=True)  # Pillow's decoding of photo.jpg: ground truth for the other variants
    save(photo, "progressive.jpg", quality=92, progressive=True)
    # Restart markers (the 1/8-scale decoder restarts its bit stream and DC prediction at each): every MCU, so the
    # marker numbers wrap past RST7, in 4:2:0; and every MCU row in 4:4:4.
    save(photo, "restart-mcu.jpg", quality=90, restart_marker_blocks=1)
    save(photo, "restart-rows-444.jpg", quality=90, subsampling=0, restart_marker_rows=1)
    save(photo, "photo.webp", lossless=True, method=6)
    save(photo, "lossy.webp", quality=85, method=6)

    shoe_jpg = src(SHOE)
    write("shoe.jpg", shoe_jpg)
    shoe = Image.open(io.BytesIO(shoe_jpg)).convert("RGB")
    # Pillow writes CMYK JPEGs the way Photoshop does: Adobe APP14 marker, inverted samples.
    cmyk = save(shoe.convert("CMYK"), "cmyk.jpg", quality=95)
    # How Pillow (libjpeg + its CMYK->RGB conversion) renders that file: the reference for our conversion.
    save(Image.open(io.BytesIO(cmyk)).convert("RGB"), "cmyk.pillow.png", optimize=True)

    gray = photo.convert("L")
    save(gray, "gray.png", optimize=True)
    save(gray, "gray.jpg", quality=92)
    g16 = (np.asarray(gray, dtype=np.uint16) * 257).astype(">u2")  # v*257: exact in both 8->16 and 16->8 directions
    write("gray16.png", png_raw(gray.width, gray.height, 16, 0, b"".join(b"\x00" + r.tobytes() for r in g16)))
    rgb16 = (np.asarray(photo, dtype=np.uint16) * 257).astype(">u2")
    write("rgb16.png", png_raw(photo.width, photo.height, 16, 2, b"".join(b"\x00" + r.tobytes() for r in rgb16)))

    # --- transparency --------------------------------------------------------------------------------------------
    cut = Image.open(io.BytesIO(src(CUTOUT))).convert("RGB")
    c = np.asarray(cut, dtype=np.int32)
    # Alpha from distance to the white studio background, with a soft edge, like a background-removal tool.
    alpha = np.clip((765 - c.sum(axis=2) - 30) * 6, 0, 255).astype(np.uint8)
    # Fully transparent pixels carry black: decoding that drops alpha instead of compositing shows up immediately.
    rgb = np.where(alpha[..., None] == 0, 0, c).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    save(rgba, "rgba.png", optimize=True)
    save(rgba, "rgba.webp", lossless=True, method=6, exact=True)
    save(composite(rgba, (255, 255, 255)), "rgba.over-white.png", optimize=True)
    la = Image.fromarray(np.dstack([np.asarray(rgba.convert("L")), alpha]), "LA")
    save(la, "la.png", optimize=True)
    save(composite(la.convert("RGBA"), (255, 255, 255)), "la.over-white.png", optimize=True)

    bag = Image.open(io.BytesIO(src(BAG))).convert("RGB")
    pal = bag.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    background_index = int(np.bincount(np.asarray(pal).ravel()).argmax())  # the grey studio backdrop
    save(pal, "palette.png", transparency=background_index, optimize=False)
    save(composite(Image.open(OUT / "palette.png").convert("RGBA"), (255, 255, 255)), "palette.over-white.png")

    # --- EXIF orientation ----------------------------------------------------------------------------------------
    for o in (3, 6, 8):
        save(stored_for(photo, o), f"exif-{o}.jpg", quality=95, exif=exif_bytes(o))
    save(stored_for(photo, 6), "exif-6.png", exif=exif_bytes(6), optimize=True)
    save(stored_for(photo, 5), "exif-5.webp", lossless=True, method=6, exif=exif_bytes(5))

    # --- broken and hostile inputs -------------------------------------------------------------------------------
    write("truncated.jpg", photo_jpg[: len(photo_jpg) * 6 // 10])
    write("truncated-eoi.jpg", photo_jpg[:-2])  # everything but the end-of-image marker
    photo_png = (OUT / "photo.png").read_bytes()
    write("truncated.png", photo_png[: len(photo_png) * 6 // 10])
    photo_webp = (OUT / "photo.webp").read_bytes()
    write("truncated.webp", photo_webp[: len(photo_webp) * 6 // 10])
    write("empty.jpg", b"")
    # What a misconfigured CDN hands out under a .jpg URL.
    write(
        "html-error.jpg",
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n",
    )
    write("garbage.bin", np.random.default_rng(1529).integers(0, 256, 512, dtype=np.uint8).tobytes())
    # Decompression bombs: headers promising 100000x100000 / 30000x30000 pixels, a few bytes of data.
    write("bomb.png", png_raw(100_000, 100_000, 8, 2, b"\x00" * 64))
    sof = photo_jpg.index(b"\xff\xc0")
    write("bomb.jpg", photo_jpg[: sof + 5] + struct.pack(">HH", 30_000, 30_000) + photo_jpg[sof + 9 :])

    # --- reference tensors ---------------------------------------------------------------------------------------
    cases = [
        ("letterbox-bilinear", "photo.png", photo, spec()),
        (
            "center-crop-bicubic-bgr-nhwc",
            "photo.png",
            photo,
            spec(resize="center_crop", crop_fraction=0.875, interpolation="bicubic", channel_order="bgr", layout="nhwc"),
        ),
        ("center-crop-upscale", "photo.png", photo, spec(width=40, height=40, resize="center_crop")),
        (
            "stretch-lanczos3",
            "photo.png",
            photo,
            spec(width=40, height=24, resize="stretch", interpolation="lanczos3", mean=[0.5] * 3, std=[0.5] * 3),
        ),
        ("stretch-nearest", "photo.png", photo, spec(width=20, height=30, resize="stretch", interpolation="nearest")),
        ("letterbox-rgba", "rgba.png", composite(rgba, (255, 255, 255)), spec(width=40, height=24)),
        (
            "letterbox-grey-fill",
            "photo.png",
            photo,
            spec(width=24, height=40, fill=[114, 114, 114], interpolation="bicubic", layout="nhwc"),
        ),
    ]
    manifest = []
    for name, input_file, img, s in cases:
        t = reference_tensor(img, s)
        np.save(OUT / f"ref-{name}.npy", t)
        manifest.append({"name": name, "input": input_file, "spec": s, "tensor": f"ref-{name}.npy"})
    (OUT / "reference.json").write_text(json.dumps(manifest, indent=2) + "\n")

    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1024:.1f} KiB, to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
