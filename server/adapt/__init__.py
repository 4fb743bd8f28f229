from .data import Example
from .jobs import AdaptJob, JobManager, QueueFull
from .methods import METHODS, AdaptMethod
from .trainer import TrainConfig

__all__ = ["METHODS", "AdaptJob", "AdaptMethod", "Example", "JobManager", "QueueFull", "TrainConfig"]
