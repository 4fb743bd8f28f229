from .engine import Engine
from .loader import LoadedModel, ModelLoadError, load_model
from .rows import ChoiceLogprob, Completion, GenerateRow, SamplingParams, ScoreRow
from .scheduler import KVCapacityError, LoopStats, ShuttingDown
from .score_queue import RowScores
from .sequence import GenerateJob

__all__ = ["ChoiceLogprob", "Completion", "Engine", "GenerateJob", "GenerateRow", "KVCapacityError", "LoadedModel",
           "LoopStats", "ModelLoadError", "RowScores", "SamplingParams", "ScoreRow", "ShuttingDown", "load_model"]
