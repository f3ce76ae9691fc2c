"""Training meta-models on model zoos, evaluating them, and predicting properties of new checkpoints.

``wsnets train CONFIG --zoo DIR --out RUN`` / :func:`run_training`; ``wsnets predict`` /
:meth:`MetaModel.predict`. Configs are TOML files in ``train/`` (schema: :mod:`.config`).
"""

from .config import TrainConfig, apply_overrides, from_dict, load_config
from .loop import evaluate, fit, predict_dataset
from .meta_model import MetaModel, build_encoder, register_encoder
from .metrics import (accuracy, classification_metrics, confusion_matrix, kendall_tau, macro_f1, mae, mean_std, r2,
                      regression_metrics, spearman)

__all__ = ["TrainConfig", "load_config", "from_dict", "apply_overrides", "fit", "evaluate", "predict_dataset",
           "MetaModel", "build_encoder", "register_encoder", "kendall_tau", "spearman", "r2", "mae", "accuracy",
           "macro_f1", "confusion_matrix", "classification_metrics", "regression_metrics", "mean_std",
           "run_training"]


def __getattr__(name):  # lazy: the experiment runner imports the zoo
    if name == "run_training":
        from .experiment import run_training
        return run_training
    raise AttributeError(name)
