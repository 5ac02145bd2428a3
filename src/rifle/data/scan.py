"""Images decoded once before training, so a bad file stops a run in its first minute, not at epoch 30.

`to_rgb` is the one conversion from whatever PIL opened to RGB, used by the scan and by the training
transforms alike: EXIF orientation applied; 16-bit and 32-bit grayscale scaled (PIL's own convert clips
them to white); transparency composited on white (PIL's convert keeps whatever colour hides under
alpha 0); palette, 1-bit, grayscale and CMYK through PIL.

`scan` decodes every image's raw bytes (Hugging Face image columns decode lazily, so bad files surface only
when read) and returns the files that fail: empty, not an image, truncated or corrupt, larger than PIL's
decompression-bomb limit, or with no RGB conversion; the verdict is cached as JSON by the datasets'
fingerprints, so each dataset is scanned once.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..files import write_text
from . import hf

SCAN_VERSION = 1
CACHE = "rifle_image_scan"  # the verdicts' folder under datasets' cache (hf.cache_dir)
WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """An RGB image as a viewer shows it (orientation, full grey range, transparency on white)."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in WIDE_GRAY:
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            arr = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        elif im.mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range onto 8 bits (I holds 16-bit PNGs in older Pillow)
        gray = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def check_image(data: bytes | None, path: str | None) -> tuple[str | None, str | None]:
    """(reason it cannot be used or None, the mode it was stored in)."""
    if data is None and not path:
        return "no image in this row", None
    if data is None and not os.path.isfile(path):
        return "file not found", None
    try:
        if (len(data) if data is not None else os.path.getsize(path)) == 0:
            return "empty file (0 bytes)", None
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            mode, limit = im.mode, Image.MAX_IMAGE_PIXELS
            # PIL only warns between 1x and 2x its limit; such an image would still be decoded in training.
            if limit and im.width * im.height > limit:
                return f"decompression bomb: {im.width}x{im.height} pixels exceeds PIL's limit of {limit}", mode
            im.load()
            if to_rgb(im).mode != "RGB":
                return f"no RGB conversion from mode {mode}", mode
            return None, mode
    except Image.DecompressionBombError as e:
        return f"decompression bomb: {e}", None
    except UnidentifiedImageError:
        return "not an image (unknown or unsupported format)", None
    except Exception as e:  # truncated (OSError), broken chunks (SyntaxError), bad EXIF (ValueError)...
        text = " ".join(str(e).split()) or type(e).__name__
        kind = "truncated file" if "truncated" in text else "corrupt file"
        return f"{kind}: {text}", None


@dataclass
class BadImage:
    split: str
    index: int
    file: str
    reason: str


@dataclass
class ScanReport:
    dataset: str
    key: str | None
    total: int
    bad: list[BadImage] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)  # stored mode -> count, of the usable images
    cached: bool = False
    cache_file: str | None = None
    policy: str | None = None

    def summary(self, limit: int = 5) -> str:
        shown = "; ".join(f"{b.file}: {b.reason}" for b in self.bad[:limit])
        more = f"; and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        where = f" (full list: {self.cache_file})" if self.cache_file and len(self.bad) > limit else ""
        return f"{len(self.bad)} of {self.total} images cannot be used ({shown}{more}){where}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def scan_key(ds) -> str | None:
    """Identity of a DatasetDict's content: its splits' datasets fingerprints (they change with the
    source files, the revision and every selection), plus this scanner's and PIL's versions."""
    h = hashlib.sha256(f"rifle-scan-{SCAN_VERSION}-pillow-{PIL.__version__}".encode())
    for split in sorted(ds):
        fp = getattr(ds[split], "_fingerprint", None)
        if not fp:
            return None
        h.update(f"|{split}:{len(ds[split])}:{fp}".encode())
    return h.hexdigest()[:24]


def _file_name(split: str, index: int, cell: dict) -> str:
    if cell.get("bytes") is None and cell.get("path"):
        return cell["path"]
    return f"{split}[{index}]" + (f" ({cell['path']})" if cell.get("path") else "")


def scan(ds, name: str, *, threads: int | None = None, cache_dir: str | Path | None = None,
         progress: bool | None = None, batch_size: int = 256) -> ScanReport:
    """Decode every image of every split of `ds` (a DatasetDict with an `image` column) once. The verdict is
    cached in `cache_dir` (default: hf.cache_dir(CACHE)); a bar shows with `progress` (default: hf.quiet_progress's
    rule, on a terminal)."""
    key = scan_key(ds)
    cache_root = Path(cache_dir) if cache_dir is not None else hf.cache_dir(CACHE)
    cache_file = cache_root / f"{key}.json" if key else None
    if cache_file is not None and cache_file.is_file():
        try:
            data = json.loads(cache_file.read_text())
            return ScanReport(**data | {"bad": [BadImage(**b) for b in data["bad"]], "dataset": name, "cached": True,
                                        "cache_file": str(cache_file)})
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable cache entry is rescanned and rewritten
    report = ScanReport(dataset=name, key=key, total=sum(len(part) for part in ds.values()))
    with hf.quiet_progress() as shown:
        _decode_all(ds, name, report, threads, shown if progress is None else progress, batch_size)
    if cache_file is not None:
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            write_text(cache_file, report.to_json())
            report.cache_file = str(cache_file)
        except OSError:
            pass  # a read-only cache only costs a rescan next time
    return report


def _decode_all(ds, name: str, report: ScanReport, threads: int | None, show: bool, batch_size: int) -> None:
    """`check_image` on every image of `ds`, recorded in `report`."""
    import datasets
    from tqdm.auto import tqdm

    bar = tqdm(total=report.total, desc=f"checking images of {name}", unit="img", disable=not show, dynamic_ncols=True)
    # PIL decoders release the GIL, so threads decode in parallel without copying the data to processes.
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool, warnings.catch_warnings(), bar:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image reports it instead
        for split in sorted(ds):
            raw = ds[split].select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
            index = 0
            for batch in raw.iter(batch_size=batch_size):
                cells = [cell or {} for cell in batch["image"]]
                results = pool.map(lambda c: check_image(c.get("bytes"), c.get("path")), cells)
                for cell, (reason, mode) in zip(cells, results):
                    if reason is None:
                        report.modes[mode] = report.modes.get(mode, 0) + 1
                    else:
                        report.bad.append(BadImage(split, index, _file_name(split, index, cell), reason))
                    index += 1
                bar.update(len(cells))


def sample_problems(ds, per_split: int) -> tuple[int, list[str]]:
    """Decode `per_split` evenly spaced images of every split (rifle.preflight's quick look; training scans all):
    (images decoded, "<file>: <reason>" of each that fails)."""
    import datasets

    checked, bad = 0, []
    for split in sorted(ds):
        raw = ds[split].select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
        for i in np.unique(np.linspace(0, len(raw) - 1, num=min(per_split, len(raw)), dtype=int)).tolist():
            cell = raw[i]["image"] or {}
            reason, _ = check_image(cell.get("bytes"), cell.get("path"))
            checked += 1
            if reason is not None:
                bad.append(f"{_file_name(split, i, cell)}: {reason}")
    return checked, bad
