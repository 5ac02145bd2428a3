"""RIFLE: re-initializing the fully-connected layer for deep transfer learning, with baselines,
Accelerate training, MLflow tracking and Optuna sweeps."""
__version__ = "0.1.0"
