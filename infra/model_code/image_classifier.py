"""The FashionMNIST/MNIST classifier as a registry consumer runs it (MLflow models-from-code; see
infra.model_code).

Artifacts: the network as a ``torch.export`` program (the graph and weights; no model class needed).
Its model config holds the training split's normalisation. Input: a batch of images, either raw
pixels (any integer dtype, 0-255, as in the IDX files) which the model normalises exactly as the data
stage does (``(pixels / 255 - mean) / std`` in float32), or already normalised floats; shaped
N x H x W, N x C x H x W, or N x (C*H*W) (one flattened image per row, e.g. a DataFrame). Output:
N x classes logits.
"""

from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class ImageClassifier(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        cfg = context.model_config
        self.program = torch.export.load(context.artifacts["program"]).module()
        self.mean, self.std = np.float32(cfg["mean"]), np.float32(cfg["std"] or 1.0)
        self.shape = tuple(int(n) for n in cfg["image_shape"])  # C, H, W
        self.classes = int(cfg["num_classes"])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        x = self.prepare(model_input)
        if not len(x):
            return np.zeros((0, self.classes), dtype=np.float32)
        with torch.no_grad():
            return self.program(torch.from_numpy(x)).numpy()

    def prepare(self, data: Any) -> np.ndarray:
        """Images as the network takes them: float32, N x C x H x W, normalised."""
        x = data.to_numpy() if isinstance(data, pd.DataFrame) else np.asarray(data)
        c, h, w = self.shape
        if x.ndim == 2 and x.shape[1] == c * h * w:
            x = x.reshape(-1, c, h, w)
        elif x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
            x = x[:, None]
        elif not (x.ndim == 4 and x.shape[1:] == (c, h, w)):
            raise MlflowException.invalid_parameter_value(
                f"images: shape {list(x.shape)}; expected N x {h} x {w}, N x {c} x {h} x {w} or N x {c * h * w}")
        if np.issubdtype(x.dtype, np.integer):
            if x.size and (x.min() < 0 or x.max() > 255):
                raise MlflowException.invalid_parameter_value(
                    f"images: integer pixels must be 0-255 (raw), found {x.min()}..{x.max()}")
            # The data stage's normalisation (tuning_core.data.idx.load_split), operation for operation.
            x = x.astype(np.float32) / 255.0
            x = (x - self.mean) / self.std
        elif np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        else:
            raise MlflowException.invalid_parameter_value(
                f"images: dtype {x.dtype}; expected raw integer pixels 0-255 or normalised floats")
        return np.ascontiguousarray(x, dtype=np.float32)


set_model(ImageClassifier())
