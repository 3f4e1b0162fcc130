"""Models-from-code entry for the logged pyfunc: loading it unpickles nothing."""
import mlflow

from cushing.release.pyfunc import CushingModel

mlflow.models.set_model(CushingModel())
