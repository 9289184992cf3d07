"""Decodes the JPEGs attrd's 1/8 tests left (ATTRD_DUMP_ONE_EIGHTH) with Pillow's libjpeg-turbo at 1/8 scale and
compares the pixels with attrd's, byte for byte. Run by scripts/check-jpeg-arm, on x86 and on emulated aarch64.

    python check_jpeg_arm.py LABEL DIR...     # each DIR holds index.tsv, NNNN.jpg and NNNN.rgb (attrd's RGB)

Prints one Markdown table row per DIR (files under 8 px on a side are skipped: Pillow cannot be asked for 1/8); exits 1 if any file differs."""
import sys

from PIL import Image, features


def compare(d):
    same, differ, skipped = 0, [], 0
    for line in open(f"{d}/index.tsv"):
        n, w, h, name = line.rstrip("\n").split("\t")
        size = (int(w), int(h))
        im = Image.open(f"{d}/{n}.jpg")
        if min(im.size) < 8:
            # draft() asks for a size, and no size below 1 px makes it choose 1/8 here.
            skipped += 1
            continue
        # draft() picks the largest DCT scale that keeps the image at least this size: 1/8 for these files.
        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        if im.size != size:
            differ.append(f"{name}: Pillow decodes at {im.size}, attrd at {size}")
            continue
        theirs = im.convert("RGB").tobytes()
        ours = open(f"{d}/{n}.rgb", "rb").read()
        if theirs == ours:
            same += 1
        else:
            diffs = [abs(a - b) for a, b in zip(theirs, ours) if a != b]
            differ.append(f"{name}: {len(diffs)} of {len(ours)} bytes differ, by up to {max(diffs)}")
    return same, differ, skipped


label, dirs = sys.argv[1], sys.argv[2:]
failed = False
for d in dirs:
    same, differ, skipped = compare(d)
    for line in differ[:10]:
        print(f"  {label} {d}: {line}", file=sys.stderr)
    failed |= bool(differ)
    print(f"| {label} | {features.version('libjpeg_turbo')} | {d.rstrip('/').rsplit('/', 1)[-1]} | {same} | {len(differ)} | {skipped} |")
sys.exit(1 if failed else 0)
