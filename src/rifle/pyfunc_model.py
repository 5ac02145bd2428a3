"""The model rifle.serving logs, as MLflow loads it ("models from code": this file is run, nothing is
unpickled; the weights are read with safetensors)."""
import mlflow

from rifle.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
