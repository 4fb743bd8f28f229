"""Adapter store: read PEFT Poly / MHR inventories, compute each task's adapter, cache, persist, export."""

from .adapter import LayerGroup, TaskAdapter
from .cache import AdapterCache, CacheStats
from .config import InventoryConfig
from .errors import (
    BrokenCompositionError,
    BrokenTaskError,
    InventoryError,
    StoreError,
    StoreWriteError,
    TaskConflictError,
    TaskNameError,
    UnknownTaskError,
)
from .export import export_peft_lora
from .inventory import Inventory, ModuleGroup
from .mix import Mix, MixError, TaskRef
from .model_check import check_model
from .names import BASE_TASK, MU_TASK, TASK_NAME_PATTERN, validate_task_name
from .registry import AdapterKey, TaskInfo
from .store import AdapterStore
from .task_registry import BrokenTask

__all__ = [
    "BASE_TASK", "MU_TASK", "TASK_NAME_PATTERN", "AdapterCache", "AdapterKey", "BrokenCompositionError", "BrokenTask",
    "BrokenTaskError", "Mix", "MixError", "StoreWriteError",
    "TaskRef", "AdapterStore", "CacheStats", "Inventory",
    "InventoryConfig", "InventoryError", "LayerGroup", "ModuleGroup", "StoreError", "TaskAdapter",
    "TaskConflictError", "TaskInfo", "TaskNameError", "UnknownTaskError", "check_model",
    "export_peft_lora", "validate_task_name",
]
