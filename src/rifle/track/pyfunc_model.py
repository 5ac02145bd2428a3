"""The model rifle.track.serving logs, as MLflow loads it ("models from code": this file is run, nothing unpickled)."""
import mlflow

from rifle.track.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
