"""Docstring pieces that several of Client's methods share (indented as in a docstring's Args / Raises section);
_docs.py puts them together."""


_TASK = """\
    task: The task whose adapter answers: a name listed by ``tasks()`` (1 to 64 characters; ``"__mu__"`` for the μ
        adapter, every skill weighted equally), or a skill-space mix of such tasks, a mapping {name: weight} such as
        ``{"alpha": 0.7, "beta": 0.3}``: served with ``Σ weight_t · (task t's skill weights)`` per layer and head,
        the weights (finite, >= 0, not all 0) normalised to sum 1; 1 to ``MHR_MAX_MIX_TASKS`` (16) tasks,
        ``"__mu__"`` and composed tasks included, tasks adapted with "mhr-mu" (a plain LoRA) not.
"""

_INPUTS = """\
    inputs: One text, or a non-empty list of texts sent together (one result per text, in their order). Each
        text has 1 to 100,000 characters and at most ``MHR_MAX_INPUT_TOKENS`` (512) tokens; one request
        carries at most ``MHR_MAX_INPUTS_PER_REQUEST`` (64) texts.
"""

_SAMPLING = """\
    max_new_tokens: The most tokens to generate per input, >= 1 and at most ``MHR_MAX_NEW_TOKENS`` (256).
        None: the server's ``MHR_DEFAULT_MAX_NEW_TOKENS`` (32).
    min_new_tokens: The end of sequence is not allowed before this many new tokens (a stop string still ends the
        output); 0 to ``max_new_tokens``. None: 0.
    ignore_eos: True: keep generating after an end of sequence, up to ``max_new_tokens`` (e.g. to measure
        throughput at a fixed length); only a stop string ends an output early. None: False.
    do_sample: False (default): greedy decoding, or beam search when ``num_beams`` > 1. True: sample the next
        token at random, shaped by ``temperature``, ``top_p``, ``top_k`` and ``seed``, which only apply then.
    temperature: Divides the logits before sampling (lower: closer to greedy); > 0 and <= 100. None: 1.0.
    top_p: Nucleus sampling: draw from the most likely tokens whose probabilities add up to ``top_p``;
        > 0 and <= 1. None: 1.0 (no filter).
    top_k: Draw from the ``top_k`` most likely tokens only; 0 to 100,000. None: 0 (no filter).
    seed: Seeds the sampler, so the same request gives the same text; 0 to 2**63 - 1. None: not seeded.
    num_beams: Beam search with this many beams; >= 1 and at most ``MHR_MAX_NUM_BEAMS`` (8). None: 1 (no beam search).
    stop: Up to 16 strings of 1 to 128 characters; an output ends just before the first of them it produces
        (the string itself is left out, ``finish_reason`` is "stop"). None: no stop strings.
"""

_LOGPROBS = """\
    logprobs: Also return each generated token's log-probability (log_softmax of the model's logits with the
        task's adapter, before temperature and filters) and the ``logprobs`` most likely tokens at its position,
        best first, in ``Output.logprobs``; 0 to 20. Not with ``num_beams`` > 1. None: none returned.
"""

_GUIDED = """\
    guided: Structured output: every output follows exactly one of ``{"json_schema": {...}}`` (validates against the
        JSON schema), ``{"regex": "..."}`` (matches the whole regular expression, Rust syntax) or
        ``{"choice": ["a", "b"]}`` (is one of the strings), and ends once complete. Not with ``num_beams`` > 1,
        ``ignore_eos`` or ``min_new_tokens``. An output cut by ``max_new_tokens`` (``finish_reason`` "length") is
        only the start of a valid one. A schema or regex the server cannot compile: ValidationError with ``.field``
        "guided.json_schema" or "guided.regex". None: free text.
"""

_TASK_REFUSED = """\
    UnknownTask: 404: ``task`` is a name the server does not know.
    Conflict: 409: ``task`` is a composed task one of whose members has been deleted since.
"""

_MIX_REFUSED = """\
    ValidationError: 422: an argument is out of range or over a server limit, or ``task`` is a mix that cannot be
        served (an unknown task, a plain-LoRA task, a weight < 0, all weights 0, too many tasks); ``.field`` names
        the part at fault (e.g. "max_new_tokens", "task.mix.beta").
"""

_JOB_ID = """\
    job_id: The job's ``id``, or the AdaptJob itself (as ``adapt()`` returned it).
"""

_TOO_LARGE = """\
    BadRequest: 413: the request body is over ``MHR_MAX_BODY_BYTES`` (8 MiB).
"""

_READING_KEY = """\
    Unauthorized: 401: no ``api_key``, where the server wants it on every route (``MHR_API_KEY_ALL_ROUTES``).
    Forbidden: 403: ``api_key`` is not the server's key.
"""

_WRITING_KEY = """\
    Unauthorized: 401: no ``api_key``, and the server has one (``MHR_API_KEY``), which this route always needs.
    Forbidden: 403: ``api_key`` is not the server's key.
"""

_SERVER_ERROR = """\
    ServerError: A 5xx answer other than 503.
"""

_UNREADABLE = """\
    MhrError: The answer is not what this route returns (e.g. not JSON). Also the base class of every exception above.
"""

_FAILURES = _SERVER_ERROR + """\
    TransportError: The server could not be reached, did not answer within ``timeout``, or dropped the connection.
""" + _UNREADABLE

_NOT_RETRIED = """\
    Overloaded: 503: the request queue is full or the model is still loading; ``.retry_after`` says when to try
        again (a POST is never retried by the client).
""" + _FAILURES

_RETRIED = """\
    Overloaded: 503 (busy or still loading), still so after ``retries`` more attempts; see ``.retry_after``.
""" + _SERVER_ERROR + """\
    TransportError: The server could not be reached, did not answer within ``timeout``, or dropped the
        connection, still so after ``retries`` more attempts.
""" + _UNREADABLE

_JOB_FIELDS = """
        Its fields: ``.id``, ``.task``, ``.method``, ``.state`` ("queued", "running", "succeeded", "failed" or
        "cancelled"; ``.done`` once it is one of the last three), ``.step`` of ``.steps``, ``.examples``, ``.loss``
        (training loss of the last step), ``.validation_loss`` and ``.validation_exact_match`` (with a validation
        split), ``.trainable_parameters``, ``.elapsed_s``, ``.eta_s`` (seconds left), ``.created``, ``.started``,
        ``.finished`` (Unix times), ``.version`` (of the task written on success), ``.stopped_early`` (why it
        stopped before ``.steps``, e.g. ``MHR_ADAPT_MAX_SECONDS``, 600 s), ``.error`` (why it failed) and
        ``.result`` (method "retrieve" or ``init="retrieve"``, once retrieved: ``{"mix": {task: weight}, "candidates":
        [{"task", "loss", "weight"}, ...]}``, every candidate task's loss on the examples, best first; ``.mix`` is
        its mix alone)."""

_TASK_FIELDS = """
        Its fields: ``.name``, ``.kind`` ("pretrained", "adapted", "composed" or "mu"), ``.version`` (goes up when
        an adapted or composed task is replaced), ``.method`` ("routed" for pretrained tasks, "mu", the adaptation
        method, "composition" for ``compose()``, "retrieve" for ``adapt(method="retrieve")``), ``.row`` (a
        pretrained task's router row), ``.created`` (Unix time an adapted or composed task was written) and
        ``.mix`` (a composed task's recipe, {task: weight} with the weights normalised; None for the other
        kinds)."""
