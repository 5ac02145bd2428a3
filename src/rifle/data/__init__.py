"""The target images: sources (Hub ids, ImageFolder, save_to_disk folders, the built-in digits) as train, val
and test splits (sources), the named datasets (registry, datasets.yaml), the image scan (scan) and the
training and evaluation transforms (transforms).

`from rifle.data import load` (a run's DataConfig -> `Loaded`: the splits, the image scan's report, the
Hub commit) and the other names of `sources` load it on first use, so that
`rifle.data.registry`, which the config checks before anything heavy loads, stays light.
"""
# What to do with images that cannot be decoded (rifle.data.scan, `load`): stop, or skip them. The choices of the
# option bad_images (rifle.config imports them: data sits below config).
BAD_IMAGES = ("error", "skip")
_SOURCES = ("DataError", "Loaded", "load", "load_source", "fingerprint", "digits_source", "per_class_subset",
            "label_rate_subset")


def __getattr__(name: str):
    if name in _SOURCES:
        from . import sources
        return getattr(sources, name)
    raise AttributeError(f"module 'rifle.data' has no attribute {name!r}")
