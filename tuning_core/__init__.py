"""tunepipe's ML core: data, search spaces, trainables, the tuning runner, retraining.

Plain Python over a pyarrow filesystem handed in; imports no prefect, mlflow or boto3.
"""
