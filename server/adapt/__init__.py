from .data import Example
from .jobs import AdaptJob, JobConflictError, JobManager, QueueFull
from .methods import METHODS, AdaptMethod
from .states import JOB_STATES, JobState
from .trainer import TrainConfig

__all__ = ["JOB_STATES", "METHODS", "AdaptJob", "AdaptMethod", "Example", "JobConflictError", "JobManager",
           "JobState", "QueueFull", "TrainConfig"]
