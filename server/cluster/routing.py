"""Which task a request is for (Ray Serve's multiplexed model id, so it goes to a replica where that task's adapter
is resident) and whether it may be sent again after the replica handling it died.

    model_id("POST", "/generate", b'{"task": "reverse-upper", ...}')   -> "reverse-upper"
    model_id("POST", "/generate", b'{"task": {"mix": {...}}, ...}')    -> ""  (a mix: any replica)
    idempotent("POST", "/score") -> True;  idempotent("POST", "/adapt") -> False
"""

from __future__ import annotations

import json
import re

from adapter_store import TASK_NAME_PATTERN

TASK_FIELD = {"/generate": "task", "/score": "task", "/v1/completions": "model", "/v1/chat/completions": "model"}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_EXPORT = re.compile(r"/tasks/([^/]+)/lora")
_TASK_NAME = re.compile(TASK_NAME_PATTERN)


def model_id(method: str, path: str, body: bytes) -> str:
    """The task a request is served with: generation, scoring (both APIs) and export name one; "" for the rest
    (a mix, a listing, a job, a body that is not JSON: any replica serves them alike)."""
    if method == "GET" and (export := _EXPORT.fullmatch(path)):
        name = export.group(1)
    elif method == "POST" and path in TASK_FIELD:
        try:
            data = json.loads(body)
        except ValueError:
            return ""
        if not isinstance(data, dict) or data.get("mix") is not None:
            return ""
        name = data.get(TASK_FIELD[path])
    else:
        return ""
    return name if isinstance(name, str) and _TASK_NAME.fullmatch(name) else ""


def idempotent(method: str, path: str) -> bool:
    """Reads, generation and scoring change nothing: sent again to another replica, they give the same answer.
    /adapt, POST /tasks and DELETE may have taken effect before the replica died: never sent again."""
    return method in SAFE_METHODS or (method == "POST" and path in TASK_FIELD)
