"""MLflow models-from-code: one file per registered model kind, copied into every model of that kind.

MLflow runs the file when the model is loaded (``mlflow.pyfunc.load_model``, ``mlflow models serve``)
in the consumer's process, where no tunepipe package exists: each file imports only mlflow, numpy,
pandas and the model's framework (xgboost, torch), and reads everything else from the model's own
artifacts. A workload names its file in its ``ModelSpec.code`` (flight_delay.py, image_classifier.py,
tabular.py); ``infra.models`` builds the logging arguments and ``infra.tracking`` logs the model.
"""
