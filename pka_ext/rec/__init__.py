"""Sequential recommendation on top of pka_ext: data readers, evaluation protocols, models.

The names a user's code needs are here; the modules hold the rest (``pka_ext.rec.data`` for the
readers, ``.protocols``, ``.evaluate``, ``.train``, ``.runner``, ``.cli``).
"""

from pka_ext.rec.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pka_ext.rec.data import DataError, Interactions, load
from pka_ext.rec.models import SeqRecModel
from pka_ext.rec.recommender import CheckpointError, Recommender
from pka_ext.rec.runner import train_run
from pka_ext.rec.synthetic import make_synthetic
from pka_ext.rec.train import TrainingDiverged

__all__ = [
    "CheckpointError",
    "DataConfig",
    "DataError",
    "Interactions",
    "ModelConfig",
    "Recommender",
    "RunConfig",
    "SeqRecModel",
    "TrainConfig",
    "TrainingDiverged",
    "load",
    "make_synthetic",
    "train_run",
]
