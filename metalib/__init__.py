"""metalib: few-shot episodes, backbones, learners and evaluation in plain PyTorch.

Knows nothing of Prefect or MLflow, so it can be tested and reused alone.
"""

from metalib import algorithms, backbones
from metalib.episodes import (
    EpisodeBatch,
    EpisodeSampler,
    FixedEpisodes,
    episode_shape_problems,
    fixed_episode_problems,
    split_per_class,
)
from metalib.evaluation import evaluate
from metalib.statistics import mean_ci95
from metalib.training import TrainingHistory, meta_train

__all__ = [
    "EpisodeBatch",
    "EpisodeSampler",
    "FixedEpisodes",
    "TrainingHistory",
    "algorithms",
    "backbones",
    "episode_shape_problems",
    "fixed_episode_problems",
    "evaluate",
    "mean_ci95",
    "meta_train",
    "split_per_class",
]
