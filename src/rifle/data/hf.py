"""What the data code shares with Hugging Face Datasets: one cache root, one rule for progress bars.

Every cache of ours for data (the image scan's verdicts, the decoded images) lives in a folder of datasets' own
cache, `datasets.config.HF_DATASETS_CACHE` ($HF_DATASETS_CACHE, else $HF_HOME/datasets, else
$XDG_CACHE_HOME/huggingface/datasets), beside the Arrow files it derives from: one variable moves them all, and one
folder holds them. Read when asked, not at import, so a test that points datasets elsewhere moves ours too.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path


def cache_dir(name: str) -> Path:
    """Our cache `name` (a folder, not created here) under datasets' cache."""
    import datasets
    return Path(datasets.config.HF_DATASETS_CACHE) / name


@contextlib.contextmanager
def quiet_progress() -> Iterator[bool]:
    """datasets' progress bars, and ours of data work, only on a terminal: in logs and CI they bury the one line
    that matters. Yields whether bars show (not where datasets' are off: off a terminal, or by the user's
    HF_DATASETS_DISABLE_PROGRESS_BARS)."""
    import datasets
    if sys.stderr.isatty() or datasets.are_progress_bars_disabled():
        yield not datasets.are_progress_bars_disabled()
        return
    datasets.disable_progress_bars()
    try:
        yield not datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()
