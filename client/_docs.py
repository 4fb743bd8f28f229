"""The docstrings of Client and AsyncClient, each written once: a blocking method and its awaited twin share one.

Limits and defaults are the server's (``server/schemas.py``, ``server/settings.py``). A limit quoted with an
``MHR_...`` setting is that setting's default, which the server's operator may change. An option left as None is not
sent, so the server's default (quoted as "None: ...") applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._doc_parts import (
    _FAILURES,
    _GUIDED,
    _INPUTS,
    _JOB_FIELDS,
    _JOB_ID,
    _LOGPROBS,
    _MIX_REFUSED,
    _NOT_RETRIED,
    _READING_KEY,
    _RETRIED,
    _SAMPLING,
    _TASK,
    _TASK_FIELDS,
    _TASK_REFUSED,
    _TOO_LARGE,
    _WRITING_KEY,
)

F = TypeVar("F", bound=Callable[..., Any])


def documented(doc: str) -> Callable[[F], F]:
    """Give the decorated method ``doc`` as its docstring (what ``help()`` shows)."""
    def apply(method: F) -> F:
        method.__doc__ = doc
        return method
    return apply


INIT = """\
Make a client for the mhr-serve server at ``base_url``; nothing is sent before the first call.

Args:
    base_url: The server's address; every route is joined to it. Default: "http://127.0.0.1:8000".
    api_key: Sent as ``Authorization: Bearer <api_key>`` with every request. A server with ``MHR_API_KEY`` wants it
        for ``adapt()``, ``cancel()``, ``compose()``, ``delete_task()`` and ``export()``, and, with
        ``MHR_API_KEY_ALL_ROUTES``, for every route but ``health()`` and ``ready()``. None (default): no key is sent.
    timeout: Seconds allowed to connect, to wait for a free connection, and for each read and each write
        (``httpx.Timeout(timeout)``): a long ``stream()`` does not time out while text keeps coming. None: wait
        for ever. Default: 60.
    retries: Further attempts of a GET or DELETE after a transport error or a 503 answer, waiting the answer's
        Retry-After, or else 0.25 s, 0.5 s, 1 s, ... (30 s at most) in between; >= 0, default 2. POST requests
        (``generate()``, ``stream()``, ``score()``, ``compose()``, ``adapt()``) are never retried.
    transport: The httpx transport that sends the requests (``httpx.BaseTransport`` for Client,
        ``httpx.AsyncBaseTransport`` for AsyncClient), e.g. ``httpx.MockTransport`` or an ASGI app's transport in
        tests. None (default): httpx's network transport.
    headers: Extra headers sent with every request; they replace the default ``User-Agent``, and ``api_key``
        replaces their ``Authorization``. None (default): none.
"""

CLOSE = """\
Close the client's connections; it cannot send requests afterwards. Leaving a ``with`` (``async with``) block calls it.
"""

GENERATE = f"""\
Generate a text for each input with the task's adapter (POST /generate).

Args:
{_TASK}{_INPUTS}{_SAMPLING}{_LOGPROBS}{_GUIDED}
Returns:
    GenerateResponse: ``.outputs``, one per input, each with ``.text``, ``.prompt_tokens``,
        ``.completion_tokens``, ``.finish_reason`` ("stop": end of sequence or a stop string; "length":
        ``max_new_tokens`` reached) and, with ``logprobs``, ``.logprobs`` (per generated token: ``.token``,
        ``.id``, ``.logprob`` and ``.top``, the most likely tokens); ``.texts`` (the texts alone), ``.usage``
        (token totals), ``.task`` (the task's name, or a mix's canonical name: "mix(alpha=0.7,beta=0.3)") and
        ``.version`` (of the task's adapter that ran; None for a mix).

Raises:
{_TASK_REFUSED}{_MIX_REFUSED}{_TOO_LARGE}{_READING_KEY}{_NOT_RETRIED}"""

STREAM = f"""\
Generate like ``generate()``, receiving each output piece by piece while it is produced (server-sent events).

Nothing is sent before the iteration starts (``for event in client.stream(...)``; ``async for`` with AsyncClient), so
every exception below, a refused request included, is raised by the iteration. A stream that ends before its last
event raises TransportError.

Args:
{_TASK}{_INPUTS}{_SAMPLING}{_GUIDED}
Yields:
    StreamEvent: For each new piece of text, ``.index`` (which input) and ``.text`` (the piece); then one last
        event with ``.done`` True and ``.response``, the whole GenerateResponse as ``generate()`` returns it.

Raises:
{_TASK_REFUSED}\
    ValidationError: 422: an argument is out of range or over a server limit, ``num_beams`` > 1 (beam search
        cannot stream: ``.field`` "stream"), or ``task`` is a mix that cannot be served (an unknown task, a
        plain-LoRA task, a weight < 0, all weights 0, too many tasks); ``.field`` names the part at fault (e.g.
        "max_new_tokens", "task.mix.beta").
    ApiError: The server reported an error in the stream after it had begun: UnknownTask, or else ServerError
        (its ``.type`` says which, e.g. "overloaded").
{_TOO_LARGE}{_READING_KEY}{_NOT_RETRIED}"""

SCORE = f"""\
Rank classification: the log-likelihood of each choice as the output for each input (POST /score).

Args:
{_TASK}{_INPUTS}\
    choices: The candidate outputs: one list for every input, or one list per input (as many lists as there
        are inputs). Each list has 1 to ``MHR_MAX_CHOICES`` (32) choices, each of 1 to 100,000 characters and at most
        ``MHR_MAX_INPUT_TOKENS`` (512) tokens.

Returns:
    ScoreResponse: ``.results``, one per input, each with ``.scores`` (per choice, in order: ``.choice``,
        ``.logprob_sum``, ``.logprob_mean`` per token, ``.tokens``), ``.best`` and ``.best_index`` (the highest
        summed log-likelihood) and ``.best_by_mean_index`` (the highest per-token mean); ``.task`` (the task's
        name, or a mix's canonical name) and ``.version`` (None for a mix).

Raises:
{_TASK_REFUSED}{_MIX_REFUSED}{_TOO_LARGE}{_READING_KEY}{_NOT_RETRIED}"""

TASKS = f"""\
List the tasks the server can serve: the μ adapter, the pretrained tasks, the adapted and the composed ones
(GET /tasks).

Returns:
    list[TaskInfo]: One per task.{_TASK_FIELDS}

Raises:
{_READING_KEY}{_RETRIED}"""

TASK = f"""\
Describe one task (GET /tasks/{{name}}).

Args:
    name: The task's name, as ``tasks()`` lists it (``"__mu__"`` for the μ adapter).

Returns:
    TaskInfo: The task.{_TASK_FIELDS}

Raises:
    UnknownTask: 404: the server has no task ``name``.
{_READING_KEY}{_RETRIED}"""

COMPOSE = f"""\
Save a skill-space mix of tasks under a name, as a composed task (POST /tasks).

The composed task is listed by ``tasks()`` with its recipe (``.mix``) and served, scored, exported and deleted like
any task. It is resolved from its members each time it is served: a member's new version reaches it, and a member
deleted makes it a Conflict until it is composed again without that member (``overwrite=True``).

Args:
    name: The composed task's name: 1 to 64 characters from [A-Za-z0-9._-], not starting with "." and not
        "__mu__".
    mix: The tasks and their weights, {{name: weight}}, as ``generate()``'s ``task`` takes a mix: 1 to
        ``MHR_MAX_MIX_TASKS`` (16) tasks (``"__mu__"`` and composed tasks included, tasks adapted with "mhr-mu"
        not), weights finite and >= 0, not all 0, normalised to sum 1 by the server.
    overwrite: True: replace the adapted or composed task already named ``name`` (its version goes up). False
        (default): such a task is a Conflict. A pretrained task is never replaced.

Returns:
    TaskInfo: The new task, ``.kind`` "composed".{_TASK_FIELDS}

Raises:
    ValidationError: 422: ``name`` is not a valid task name (``.field`` "task"), or ``mix`` cannot be served (an
        unknown task, a plain-LoRA task, a weight < 0, all weights 0, too many tasks; ``.field`` e.g. "mix.beta").
    Conflict: 409: ``name`` is a pretrained task, or an adapted or composed one and ``overwrite`` is False, or the
        mix would contain the new task itself (through a composed member).
{_TOO_LARGE}{_WRITING_KEY}{_NOT_RETRIED}"""

DELETE_TASK = f"""\
Delete an adapted or composed task: its file and its cached adapters (DELETE /tasks/{{name}}).

Composed tasks that use it fail (Conflict) from then on, until composed again without it.

Args:
    name: The adapted or composed task's name.

Returns:
    TaskInfo: The deleted task, as it was.{_TASK_FIELDS}

Raises:
    UnknownTask: 404: the server has no task ``name`` (also when a retried DELETE had in fact succeeded).
    Conflict: 409: ``name`` is a pretrained task or the μ adapter, which cannot be deleted.
{_WRITING_KEY}{_RETRIED}"""

ADAPT = f"""\
Start adapting a new task to a few examples, as a background job on the server (POST /adapt).

The server trains one job at a time; on success the task is saved, listed by ``tasks()`` and served at once.
``wait()`` follows the job to its end. Method "retrieve" trains nothing: it finds the best mix of known tasks
(``.result`` of the finished job) and saves it as a composed task.

Args:
    task: The new task's name: 1 to 64 characters from [A-Za-z0-9._-], not starting with "." and not "__mu__".
    examples: The training examples, each an ``(input, target)`` pair or a mapping with "input" and "target"
        keys: 1 to ``MHR_ADAPT_MAX_EXAMPLES`` (256) of them, each text of 1 to 100,000 characters and at most
        ``MHR_MAX_INPUT_TOKENS`` (512) tokens.
    method: What is trained over the frozen model and skills: "mhr-z" (default; a routing-logits row per layer,
        H·K numbers), "poly-z" (K routing logits per layer, shared by the heads), "mhr-mu" (the averaged LoRA
        of each layer, A and B, saved as a plain LoRA) or "retrieve" (nothing: every task with skill weights is
        scored on the examples, loss_t = mean negative log-likelihood per target token, and the ``k`` best are
        mixed with weights softmax(-loss_t), saved as a composed task with method "retrieve").
    init: Where "mhr-z" and "poly-z" start: "uniform" (every skill weighted equally) or "retrieve" (the mix that
        method "retrieve" would find, reported in ``.result``); any other method refuses "retrieve" (422).
        None: "uniform".
    k: How many of the best tasks a retrieved mix keeps ("retrieve", or ``init="retrieve"``), 1 to 16. None: 3.
    steps: Training steps (AdamW), >= 1 and at most ``MHR_ADAPT_MAX_STEPS`` (2000). None: 200. A job also stops,
        and saves, after ``MHR_ADAPT_MAX_SECONDS`` (600 s). "retrieve" takes no steps (its job ends at step 1 of
        ``steps``).
    learning_rate: > 0 and <= 10. None: 0.1 for "mhr-z" and "poly-z", 1e-3 for "mhr-mu".
    batch_size: Examples per step, 1 to 256. None: 8.
    seed: Seeds the validation split, the order of the examples and torch; 0 to 2**63 - 1. None: 0.
    validation_fraction: The share of the examples held out to report ``validation_loss`` and
        ``validation_exact_match`` (at least one example is kept for training); 0 to 0.5. None: 0 (none held out).
    overwrite: True: replace the adapted or composed task already named ``task`` (its version goes up). False
        (default): such a task is a Conflict. A pretrained task is never replaced.

Returns:
    AdaptJob: The new job, normally "queued".{_JOB_FIELDS}

Raises:
    ValidationError: 422: an argument is out of range, over a server limit or not a valid task name; ``.field``
        names it (e.g. "examples.3.target", "init").
    Conflict: 409: ``task`` is a pretrained task, or an adapted or composed one and ``overwrite`` is False, or
        another job adapting ``task`` is queued or running.
    Overloaded: 503: ``MHR_ADAPT_MAX_QUEUED`` (8) jobs are already waiting, or the model is still loading;
        ``.retry_after`` says when to try again (a POST is never retried by the client).
{_TOO_LARGE}{_WRITING_KEY}{_FAILURES}\
    ValueError: An example is neither a pair nor a mapping with both keys (raised before anything is sent).
"""

JOB = f"""\
Fetch an adaptation job's current state and progress (GET /adapt/{{job_id}}).

Args:
{_JOB_ID}
Returns:
    AdaptJob: The job.{_JOB_FIELDS}

Raises:
    NotFound: 404: the server has no such job.
{_READING_KEY}{_RETRIED}"""

JOBS = f"""\
List every adaptation job the server knows, oldest first (GET /adapt).

Returns:
    list[AdaptJob]: One per job.{_JOB_FIELDS}

Raises:
{_READING_KEY}{_RETRIED}"""

CANCEL = f"""\
Cancel an adaptation job (DELETE /adapt/{{job_id}}); a cancelled job writes nothing.

A queued job is cancelled at once; a running one is asked to stop at its next step and reads "running" (with
``cancel_requested`` true) until then (``wait()`` returns it "cancelled").

Args:
{_JOB_ID}
Returns:
    AdaptJob: The job after the request.{_JOB_FIELDS}

Raises:
    NotFound: 404: the server has no such job.
    Conflict: 409: the job has already ended (also when a retried DELETE had in fact succeeded).
{_WRITING_KEY}{_RETRIED}"""

WAIT = f"""\
Poll an adaptation job with ``job()`` until it has succeeded, failed or been cancelled, and return it.

A failed or cancelled job is returned, not raised: check ``.state`` (and ``.error``).

Args:
{_JOB_ID}\
    poll_interval: Seconds between two polls, > 0. Default: 0.5.
    timeout: Seconds to wait in all before raising WaitTimeout, >= 0 (each request is still bounded by the
        client's own ``timeout``). None (default): wait for ever.
    on_progress: A plain function (not awaited, also by AsyncClient) called with each AdaptJob polled, the last
        one included, e.g. to show ``.step`` of ``.steps`` and ``.loss``; what it returns is ignored.
        None (default): no callback.

Returns:
    AdaptJob: The job in its final state.{_JOB_FIELDS}

Raises:
    WaitTimeout: The job had not ended after ``timeout`` seconds; ``.job`` is its last state seen. The job goes on
        on the server (``cancel()`` stops it). It is also a TimeoutError.
    NotFound: 404: the server has no such job.
{_READING_KEY}{_RETRIED}"""

EXPORT = f"""\
Download a task's adapter as a standard PEFT LoRA folder (GET /tasks/{{task}}/lora) and unpack it into ``dest_dir``.

The folder (``adapter_config.json``, ``adapter_model.safetensors``) loads with ``PeftModel.from_pretrained``, vLLM
or LoRAX.

Args:
    task: The task's name, as ``tasks()`` lists it; any kind of task can be exported.
    dest_dir: The folder to unpack into; it is created if missing, and files of the same names are overwritten.

Returns:
    Path: ``dest_dir/<task>``, the LoRA folder.

Raises:
    UnknownTask: 404: the server has no task ``task``.
    ExportError: The answer is not a zip archive, or one of its entries would be written outside ``dest_dir``
        (nothing is written then).
{_WRITING_KEY}{_RETRIED}"""

HEALTH = f"""\
Check that the server process answers (GET /healthz), loaded or not.

Returns:
    dict: ``{{"status": "ok"}}``.

Raises:
{_RETRIED}"""

READY = f"""\
Ask whether the server has loaded its model and inventory and can serve (GET /readyz); not retried.

Returns:
    Readiness: ``.ready`` True and ``.status`` "ready", with ``.inventory`` (its fingerprint), ``.tasks`` (how
        many), ``.device`` and ``.dtype``; or ``.status`` "loading" (the server's 503, returned rather than
        raised).

Raises:
{_FAILURES}"""
