from .engine import Engine
from .loader import LoadedModel, ModelLoadError, load_model
from .requests import ChoiceScore, Completion, GenerateRow, SamplingParams, ScoreRow

__all__ = ["ChoiceScore", "Completion", "Engine", "GenerateRow", "LoadedModel", "ModelLoadError", "SamplingParams",
           "ScoreRow", "load_model"]
