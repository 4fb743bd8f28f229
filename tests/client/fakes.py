"""Canned answers of the mhr-serve API and a recording MockTransport handler, shared by the client tests."""

import io
import json
import zipfile

import httpx

GENERATED = {"task": "alpha", "version": 1, "usage": {"prompt_tokens": 3, "completion_tokens": 2},
             "outputs": [{"text": "hi", "prompt_tokens": 3, "completion_tokens": 2, "finish_reason": "length"}]}
TASKS = {"tasks": [{"name": "alpha", "kind": "pretrained", "version": 1, "method": "mhr", "row": 0, "created": None}]}
MIX_NAME = "mix(alpha=0.75,beta=0.25)"
MIXED = {**GENERATED, "task": MIX_NAME, "version": None}  # a mix's answer: its canonical name, no version
COMPOSED = {"name": "blend", "kind": "composed", "version": 2, "method": "composition", "row": None, "created": 5.0,
            "mix": {"alpha": 0.75, "beta": 0.25}}
RETRIEVED = {"mix": {"alpha": 0.6, "beta": 0.4},
             "candidates": [{"task": "alpha", "loss": 0.5, "weight": 0.6}, {"task": "beta", "loss": 0.9, "weight": 0.4},
                            {"task": "__mu__", "loss": 2.0, "weight": 0.0}]}


def job_body(state="running", step=3, **extra):
    return {"id": "j1", "task": "new", "method": "mhr-z", "state": state, "step": step, "steps": 10, "examples": 4,
            "loss": 1.5, "validation_loss": None, "validation_exact_match": None, "trainable_parameters": 96,
            "elapsed_s": 1.0, "eta_s": 2.0, "created": 1.0, "started": 1.0, "finished": None, "version": None,
            "stopped_early": None, "error": None, **extra}


def error(status, type_, message="nope", field=None, headers=None):
    return httpx.Response(status, json={"error": {"type": type_, "message": message, "field": field}},
                          headers=headers)


class Recorder:
    """A MockTransport handler answering from a list (or a function) and keeping the requests."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)  # fresh each time

    def body(self, i=-1):
        return json.loads(self.requests[i].content)


SSE = (
    'data: {"index": 0, "text": "h"}\n\n'
    ': a comment\n'
    'data: {"index": 0, "text": "i"}\r\n\r\n'
    f'event: done\ndata: {json.dumps(GENERATED)}\n\n'
)


def make_zip(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()
