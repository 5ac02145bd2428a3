"""The logged MLflow model, in this process (the served-model test in test_mlflow_model.py starts a
subprocess and a server): one tiny run logs it, pyfunc loads it from code and labels real images."""
import numpy as np
from PIL import Image

from conftest import mlflow_runs
from rifle import config as C


def test_a_tiny_run_logs_a_model_that_labels_images(tmp_path, digits_folder, monkeypatch):
    import mlflow

    from rifle.trainer import fit
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = fit(C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 16,
                          "train_per_class": 3, "val_fraction": 0.1, "epochs": 1, "tricks": "dropconnect",
                          "tracking_uri": uri, "output_dir": str(tmp_path / "out")}))
    _, (run,) = mlflow_runs(uri)
    assert run.info.run_id == result["run_id"]
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{result['run_id']}/model")
    finally:
        mlflow.set_tracking_uri(None)
    files = sorted((digits_folder / "test").glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    out = model.predict(images)
    assert list(out.columns) == ["label", "class_name", "probability"] and len(out) == len(files)
    assert set(out["label"]) <= {0, 1, 2, 3} and (out["class_name"] == out["label"].astype(str)).all()
    assert ((out["probability"] > 0.25 - 1e-6) & (out["probability"] <= 1)).all()  # the top of 4 classes
