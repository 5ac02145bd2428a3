"""The logged MLflow model, in this process (the served-model test in test_mlflow_model.py starts a
subprocess and a server): one tiny run logs it, pyfunc loads it from code and labels real images."""
import numpy as np
import pytest

from conftest import mlflow_runs
from rifle import config as C


def test_a_tiny_run_logs_a_model_that_labels_images_as_training_evaluated_them(tmp_path, digits_folder, monkeypatch):
    """The served model gives, on the run's own test images, the probabilities of the trained network fed by
    the trainer's evaluation transform, and so the run's test_acc."""
    import mlflow
    import torch
    from torch.utils.data import DataLoader

    from rifle import checkpoint
    from rifle.data import load
    from rifle.models import build_model
    from rifle.data.scan import to_rgb
    from rifle.trainer import fit
    from rifle.data.transforms import build_transform, collate
    from rifle.tricks import build_tricks
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 16, "train_per_class": 3,
                   "val_fraction": 0.1, "epochs": 1, "tricks": "dropconnect", "tracking_uri": uri,
                   "output_dir": str(tmp_path / "out")})
    result = fit(cfg)
    _, (run,) = mlflow_runs(uri)
    assert run.info.run_id == result["run_id"]
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{result['run_id']}/model")
    finally:
        mlflow.set_tracking_uri(None)
    test = load(cfg.data).data["test"]
    images = np.stack([np.asarray(to_rgb(im)) for im in test["image"]])
    out = model.predict(images)
    assert list(out.columns) == ["label", "class_name", "probability"] and len(out) == len(test)
    assert (out["class_name"] == out["label"].astype(str)).all()
    # the reference: the selected weights in the network as trained, and the trainer's evaluation transform
    net = build_model(cfg.model.model, 4, cfg.model.pretrained, cfg.model.backbone_dropout)
    for trick in build_tricks(cfg):
        trick.prepare_model(net)
    (best,) = (tmp_path / "out").glob("best-*.safetensors")
    checkpoint.load_weights(net, best)
    transform = build_transform(cfg.data.image_size, net.mean, net.std, train=False)
    (batch, _), = DataLoader(test.with_transform(transform), batch_size=len(test), collate_fn=collate)
    with torch.no_grad():
        probs = net.eval()(batch).softmax(1)
    assert out["label"].tolist() == probs.argmax(1).tolist()
    assert np.allclose(out["probability"], probs.max(1).values.numpy(), atol=1e-5)
    assert (out["label"] == np.asarray(test["label"])).mean() == pytest.approx(result["test_acc"])
