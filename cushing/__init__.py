"""cushing: MLflow-tracked experiments for screening Cushing's syndrome from frontal facial photos."""
__version__ = "0.1.0"
