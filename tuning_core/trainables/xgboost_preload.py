"""Imported by each Python worker of the embedded default's local Ray as it starts, before it takes
work (``Workload.worker_preload``, Ray's ``preload_python_modules``): what an XGBoost trial imports
first (~1.5 s on a busy 2-core machine) is then done while the driver runs preflight and data
preparation. xgboost comes in without scikit-learn (``import_xgboost``)."""

from ray.tune.trainable import function_trainable  # noqa: F401 - the trial actor's class

from tuning_core.trainables.xgboost import import_xgboost

import_xgboost()
