"""Worst-case uploads for the bounded decoder: peak memory and CPU of each, one process per case.

    .venv/bin/python -m tests.hostile_images [--check] [--only NAME ...]

Every case is built here (each fits the default 4 MiB body limit): strips, the largest pictures
the limits admit in each format and mode (RGBA with an EXIF rotation, 16-bit, palette with
transparency, 1-bit, progressive JPEG, multi-frame GIF/APNG/TIFF/WebP) and ones just over them.
Each runs through the real preprocessing (``modelspec.imaging.preprocess_digit`` with the
service's default limits) in a fresh subprocess that warms up on every format, resets its peak RSS
(``/proc/self/clear_refs``), then reports the peak RSS above that baseline (VmHWM − VmRSS) and its
CPU seconds (user + system, all threads). ``--check`` exits 1 if an accepted upload exceeds the
targets of issue 9 (100 MB, 1 s of CPU) or a case's outcome is not the expected one.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from modelspec.image_decode import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, MAX_ASPECT

REPO = Path(__file__).resolve().parent.parent
MAX_BODY = 4 * 1024 * 1024
TARGET_PEAK_BYTES = 100_000_000
TARGET_CPU_S = 1.0
SQUARE = int(DEFAULT_MAX_PIXELS**0.5)  # 4000: the largest square picture admitted
LONG = DEFAULT_MAX_SIDE  # the longest side admitted …
SHORT = DEFAULT_MAX_PIXELS // LONG  # … with as many pixels as the budget allows
THIN = -(-LONG // MAX_ASPECT)  # the thinnest strip admitted at the longest side


def raw_png(width: int, height: int, depth: int, color: int, row: Callable[[int], bytes]) -> bytes:
    """A PNG written chunk by chunk (any size, 16-bit colour): ``row(y)`` gives each row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" + row(y)) for y in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def strip_png(width: int, height: int) -> bytes:
    """8-bit grayscale, black with a white middle third: ~1 KB for a million pixels."""
    if height == 1:
        line = bytes(width // 3) + b"\xff" * (width // 3) + bytes(width - 2 * (width // 3))
        return raw_png(width, 1, 8, 0, lambda _: line)
    return raw_png(
        width, height, 8, 0, lambda y: b"\xff" if height // 3 <= y < 2 * height // 3 else b"\0"
    )


def digit(mode: str, size: tuple[int, int], ink: object, paper: object) -> Image.Image:
    """A thick '7' on plain paper, scaled to ``size``."""
    img = Image.new(mode, size, paper)  # type: ignore[arg-type]
    w, h = size
    line = max(2, min(w, h) // 12)
    draw = ImageDraw.Draw(img)
    draw.line([(w * 0.3, h * 0.2), (w * 0.7, h * 0.2), (w * 0.45, h * 0.8)], fill=ink, width=line)  # type: ignore[arg-type]
    return img


def save(img: Image.Image | list[Image.Image], fmt: str, **kw: object) -> bytes:
    frames = img if isinstance(img, list) else [img]
    buf = io.BytesIO()
    if len(frames) > 1:
        kw = {"save_all": True, "append_images": frames[1:], **kw}
    frames[0].save(buf, fmt, **kw)
    return buf.getvalue()


def rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    return exif.tobytes()


def sixteen_bit_rgba(size: int) -> bytes:
    """RGBA, 16 bits a channel (Pillow cannot write these): a white bar on transparent black."""
    bar = range(size // 3, 2 * size // 3)
    opaque, clear = b"\xff" * 8 * (size // 10), b"\0" * 8 * (size - size // 10)
    return raw_png(
        size, size, 16, 6, lambda y: opaque + clear if y in bar else clear + bytes(8 * (size // 10))
    )


def many_scans(jpeg: bytes, copies: int) -> bytes:
    """A progressive JPEG whose last scan is repeated ``copies`` times (a CPU bomb)."""
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * copies + b"\xff\xd9"


def rle_bmp(width: int, height: int) -> bytes:
    """An 8-bit run-length encoded BMP of one-pixel runs (Pillow decodes these in Python)."""
    runs = b"\x01\x05" * ((MAX_BODY - 2048) // 2) + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 0, 0, 256, 0)
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + len(info) + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + len(runs), 0, 0, offset)
    return head + info + palette + runs


def text_bomb() -> bytes:
    """A small PNG with zTXt chunks that inflate to 1 MiB each."""
    base = save(digit("L", (64, 64), 0, 255), "PNG")
    payload = b"k\0\0" + zlib.compress(b" " * (1 << 20), 9)
    body = b"zTXt" + payload
    chunk = struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))
    return base[:33] + chunk * 100 + base[33:]


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # "accepted" or "<status> <code>"
    build: Callable[[], bytes]


def _rgba(size: tuple[int, int], alpha: int = 0) -> Image.Image:
    return digit("RGBA", size, (0, 0, 0, 255), (0, 0, 0, alpha))


def _rgb(size: tuple[int, int]) -> Image.Image:
    return digit("RGB", size, (0, 0, 0), (255, 255, 255))


def _palette(size: tuple[int, int], ink: int = 1) -> Image.Image:
    img = digit("P", size, ink, 0)
    img.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128, 60, 60, 60])
    return img


SQ = (SQUARE, SQUARE)
P444 = int((DEFAULT_MAX_PIXELS * 2 / 3) ** 0.5) // 8 * 8  # the largest progressive 4:4:4 admitted
TOO_LARGE, INVALID, UNSUPPORTED = (
    "413 image_too_large",
    "422 invalid_image",
    "415 unsupported_image",
)
CASES = (
    Case("strip 1,000,000x1 PNG", TOO_LARGE, lambda: strip_png(1_000_000, 1)),
    Case("strip 1x1,000,000 PNG", TOO_LARGE, lambda: strip_png(1, 1_000_000)),
    Case("strip 2,000,000x1 PNG", TOO_LARGE, lambda: strip_png(2_000_000, 1)),
    Case(
        f"strip {LONG}x{THIN - 1} PNG (over the aspect limit)",
        INVALID,
        lambda: save(digit("L", (LONG, THIN - 1), 255, 0), "PNG"),
    ),
    Case(
        f"strip {LONG}x{THIN} PNG (at the aspect limit)",
        "accepted",
        lambda: save(digit("L", (LONG, THIN), 255, 0), "PNG"),
    ),
    Case(
        "5000x5000 RGBA PNG, EXIF rotation",
        TOO_LARGE,
        lambda: save(_rgba((5000, 5000)), "PNG", exif=rotated_exif()),
    ),
    Case(
        f"{SQUARE}x{SQUARE} RGBA PNG, EXIF rotation",
        "accepted",
        lambda: save(_rgba(SQ), "PNG", exif=rotated_exif()),
    ),
    Case(
        f"{LONG}x{SHORT} RGBA PNG",
        "accepted",
        lambda: save(digit("RGBA", (LONG, SHORT), (0, 0, 0, 255), (255,) * 4), "PNG"),
    ),
    Case(
        f"{SQUARE}x{SQUARE} 16-bit gray PNG",
        "accepted",
        lambda: save(digit("I;16", SQ, 60_000, 0), "PNG"),
    ),
    Case(f"{SQUARE}x{SQUARE} 16-bit RGBA PNG", "accepted", lambda: sixteen_bit_rgba(SQUARE)),
    Case(
        f"{SQUARE}x{SQUARE} palette PNG, tRNS",
        "accepted",
        lambda: save(_palette(SQ), "PNG", transparency=0),
    ),
    Case(f"{SQUARE}x{SQUARE} 1-bit PNG", "accepted", lambda: save(digit("1", SQ, 0, 1), "PNG")),
    Case(
        f"{SQUARE}x{SQUARE} JPEG, EXIF rotation",
        "accepted",
        lambda: save(_rgb(SQ), "JPEG", exif=rotated_exif()),
    ),
    Case(
        f"{SQUARE}x{SQUARE} CMYK JPEG",
        "accepted",
        lambda: save(digit("CMYK", SQ, (0, 0, 0, 255), (0, 0, 0, 0)), "JPEG"),
    ),
    Case(
        f"{SQUARE}x{SQUARE} progressive JPEG 4:2:0",
        "accepted",
        lambda: save(_rgb(SQ), "JPEG", progressive=True),
    ),
    Case(
        f"{SQUARE}x{SQUARE} progressive JPEG 4:4:4",
        TOO_LARGE,
        lambda: save(_rgb(SQ), "JPEG", progressive=True, subsampling=0),
    ),
    Case(
        f"{P444}x{P444} progressive JPEG 4:4:4",
        "accepted",
        lambda: save(_rgb((P444, P444)), "JPEG", progressive=True, subsampling=0),
    ),
    Case(
        "progressive JPEG, 1000 scans",
        INVALID,
        lambda: many_scans(save(_rgb((800, 800)), "JPEG", progressive=True), 1000),
    ),
    Case(
        f"{SQUARE}x{SQUARE} GIF, 3 frames",
        "accepted",
        lambda: save([_palette(SQ, i + 1) for i in range(3)], "GIF"),
    ),
    Case(
        f"{SQUARE}x{SQUARE} APNG, 3 frames",
        "accepted",
        lambda: save([_rgba(SQ, i) for i in range(3)], "PNG"),
    ),
    Case(
        f"{SQUARE}x{SQUARE} TIFF, 3 pages, deflate",
        "accepted",
        lambda: save([_rgba(SQ, i) for i in range(3)], "TIFF", compression="tiff_adobe_deflate"),
    ),
    Case(
        f"{SQUARE}x{SQUARE} TIFF, JPEG-compressed",
        "accepted",
        lambda: save(_rgb(SQ), "TIFF", compression="jpeg"),
    ),
    Case(
        f"{SQUARE}x{SQUARE} WebP, 3 frames",
        TOO_LARGE,
        lambda: save([_rgba(SQ, i) for i in range(3)], "WEBP", lossless=True),
    ),
    Case(
        f"{SQUARE // 2}x{SQUARE // 2} WebP, 3 frames (a quarter of the budget)",
        "accepted",
        lambda: save([_rgba((SQUARE // 2, SQUARE // 2), i) for i in range(3)], "WEBP"),
    ),
    Case(
        f"{SQUARE}x{SQUARE} BMP, RLE8 of 1-pixel runs", UNSUPPORTED, lambda: rle_bmp(SQUARE, SQUARE)
    ),
    Case("PNG with 100 MiB of zTXt", INVALID, text_bomb),
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(path: str) -> dict[str, object]:
    """In a fresh process: warm up, reset the peak, preprocess the file, report."""
    from modelspec.imaging import ImageError, preprocess_digit

    small = digit("RGB", (64, 64), (0, 0, 0), (255, 255, 255))
    for fmt in ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"):
        preprocess_digit(save(small, fmt))
    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base, start = _status("VmRSS"), _cpu()
    try:
        preprocess_digit(data)
        outcome = "accepted"
    except ImageError as exc:
        outcome = f"{exc.status} {exc.code}"
    return {"outcome": outcome, "peak": _status("VmHWM") - base, "cpu": _cpu() - start}


def measure(data: bytes) -> dict[str, object]:
    """Run one upload through the preprocessing in a subprocess; its outcome, peak and CPU."""
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(data)
        f.flush()
        out = subprocess.run(
            [sys.executable, "-m", "tests.hostile_images", "--child", f.name],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a miss")
    parser.add_argument("--only", nargs="*", default=[], help="substrings of case names")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    print("| case | bytes | outcome | peak RSS above baseline | CPU |")
    print("| --- | ---: | --- | ---: | ---: |")
    worst_peak, worst_cpu, over = 0, 0.0, []
    for case in CASES:
        name = case.name
        if args.only and not any(s in name for s in args.only):
            continue
        data = case.build()
        r = measure(data)
        peak, cpu = int(r["peak"]), float(r["cpu"])  # type: ignore[arg-type]
        note = "" if len(data) <= MAX_BODY else " (over the body limit)"
        size = f"{len(data):,}{note}"
        mib = f"{peak / 2**20:.1f} MiB"
        print(f"| {name} | {size} | {r['outcome']} | {mib} | {cpu:.2f} s |", flush=True)
        if r["outcome"] != case.expect:
            over.append(f"{name}: expected {case.expect}")
        if r["outcome"] == "accepted":
            worst_peak, worst_cpu = max(worst_peak, peak), max(worst_cpu, cpu)
            if peak > TARGET_PEAK_BYTES or cpu > TARGET_CPU_S:
                over.append(name)
    mib, mb = worst_peak / 2**20, worst_peak / 1e6
    print(f"\nworst accepted: {mib:.1f} MiB ({mb:.0f} MB) above baseline, {worst_cpu:.2f} s CPU")
    if over:
        print("FAILED (targets: 100 MB, 1 s; expected outcomes): " + "; ".join(over))
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
