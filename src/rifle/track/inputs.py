"""A run's data as MLflow dataset inputs (the UI's Datasets column, `run.inputs.dataset_inputs`): train, val
(when there is one) and test, each with its context (training, validation, test).

Metadata only (`MetaDataset` over a source): `mlflow.data.from_huggingface` would convert up to 10,000 rows to
pandas for its digest and drop the image column (mlflow#13020), minutes on a large image set. The source is
where the images come from: the Hub id, its split and the commit the run loaded (`HuggingFaceDatasetSource`), the
folder of an imagefolder:, disk: or local Hub-style dataset, or the scikit-learn loader of the built-in digits.
The digest comes from the run's data fingerprint (rifle.data.fingerprint), the Hub commit and the split; the
profile holds the number of images and classes. Imported by the tracker of the main process only (MLflow loads).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow.data import sources
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import ColSpec, DataType, Schema

from ..data import registry
from .reads import dataset_label

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def source_of(spec: str, registry_file: str | None, revision: str | None, split: str | None):
    """The MLflow DatasetSource of dataset `spec` (a registry name resolved to its source); `split`: the source's
    own split the rows come from (None where the source has no split names, e.g. digits)."""
    entry = registry.lookup(spec, registry_file)
    source = entry.source if entry is not None else spec
    if source == "digits":
        import sklearn
        return CodeDatasetSource({"loader": "sklearn.datasets.load_digits", "scikit-learn": sklearn.__version__,
                                  "split": "rifle.data.sources.digits_source: half of each class is test (seed 0)"})
    for prefix in ("imagefolder:", "disk:"):
        if source.startswith(prefix):
            return sources.LocalArtifactDatasetSource(str(Path(source[len(prefix):]).expanduser().resolve()))
    hub_id = source.removeprefix("hub:")
    if Path(hub_id).expanduser().is_dir():  # a local folder laid out like a Hub dataset
        return sources.LocalArtifactDatasetSource(str(Path(hub_id).expanduser().resolve()))
    return HuggingFaceDatasetSource(path=hub_id, split=split, revision=revision)


class ImageSplit(MetaDataset):
    """A MetaDataset with a profile (MetaDataset has none): the number of images and classes, which the UI shows."""

    def __init__(self, source, name: str, digest: str, schema, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def dataset_inputs(spec: str, registry_file: str | None, data, revision: str | None, fingerprint: str) -> list:
    """[(ImageSplit, context)] for each split of `data` (the run's DatasetDict, after subsets and the scan)."""
    schema = Schema([ColSpec(DataType.binary, "image"), ColSpec(DataType.long, "label")])  # encoded image, class
    out = []
    for split, part in data.items():
        own = None if getattr(part, "split", None) is None else str(part.split)  # val carved from train: train
        digest = hashlib.sha256(f"{fingerprint}:{revision or ''}:{split}".encode()).hexdigest()[:10]
        profile = {"num_rows": len(part), "num_classes": len(part.features["label"].names), "split": split}
        out.append((ImageSplit(source_of(spec, registry_file, revision, own), f"{dataset_label(spec)}:{split}",
                               digest, schema, profile), CONTEXTS.get(split, split)))
    return out
