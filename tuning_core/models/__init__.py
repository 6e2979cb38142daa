"""Image classifiers in plain torch (``tuning_core.models.cnn``).

``MODEL_NAMES`` are the keys of ``cnn.MODELS``, kept here without importing torch so that configs
(and the Prefect form's dropdown) can offer and check them where torch is not installed; a unit test
keeps the two equal.
"""

MODEL_NAMES: tuple[str, ...] = ("cnn", "resnet18")
