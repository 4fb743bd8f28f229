"""The engine: one backbone with every target linear wrapped once, adapters from the cache, and the serving loop
(scheduler.py) that owns the model. Everything that runs the model goes through the loop's thread; the methods
here are the engine's operations, safe to call from any other thread:

    generate(rows) / submit_generate(rows)     continuous batching (rows join and leave at every step; beam
                                               searches are rows of the same batch)
    score(rows) / submit_score(rows)           teacher-forced log-likelihoods, in chunks between steps
    train_step(make_adapter, batch)            forward + backward of one /adapt step, yielding to generation
    loss(adapter, batch)                       a loss without gradients (validation)
    forget_task(name)                          drop every cached adapter of a task (deleted or re-adapted)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from adapter_store import AdapterCache, AdapterKey, AdapterStore, TaskAdapter, TaskRef, check_model
from adapter_store.arrow import ArrowLibraries, ArrowSpec

from . import arrow_prompt, arrow_rows
from .adapter_slots import AdapterSlots
from .arrow_rows import ArrowAdapter, ArrowKey
from .block_manager import BlockManager
from .kv_pool import KVPool
from .loader import LoadedModel, ModelLoadError, eos_token_ids
from .memory_plan import Demands, MemoryFigures, kv_bytes_per_position, make_resident, measure, plan_memory
from .model_support import check_loop_supported
from .paged_attention import avoid_per_length_attention_plans, install
from .paged_kv import PagedKV
from .plan import Policy
from .prepack import prepack_supported
from .rows import ChoiceLogprob, Completion, GenerateRow, SamplingParams, ScoreRow, TokenLogprob
from .running_batch import RunningBatch
from .scheduler import LoopStats, Scheduler
from .score_queue import ScoreJob
from .scoring import prompt_logprobs, score_pairs
from .sequence import GenerateJob, RowMaker
from .static_step import StaticDecode

log = logging.getLogger(__name__)
DEFAULT_BATCH_TOKENS = 16384
MAX_ARROW_ROUTES = 8  # Arrow routes (over, top_k, temperature) kept ready; rows running keep theirs regardless
DEFAULT_LONGEST_ROW = 512 + 256 + 1  # the default max_input_tokens + max_new_tokens + a decoder start
DEFAULT_BLOCK_SIZE = 16
DEFAULT_PREFILL_CHUNK = 512  # a causal LM's longer prompt is prefilled in chunks of this many tokens


class Engine:
    def __init__(self, loaded: LoadedModel, store: AdapterStore, cache: AdapterCache, *,
                 merge_single_task: bool | None = None, max_batch_size: int = 16,
                 max_batch_tokens: int = DEFAULT_BATCH_TOKENS, longest_row: int = DEFAULT_LONGEST_ROW,
                 prepack_weights: bool | None = None, memory_fraction: float = 0.9,
                 memory: MemoryFigures | None = None, memory_limit_bytes: int | None = None,
                 kv_block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_bytes: int | None = None,
                 prefix_cache: bool = True, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 static_step: str | None = None, gather_joins: bool = True):
        """merge_single_task / prepack_weights: None (auto: on where the memory plan fits them), True (start-up fails
        where it cannot), False. max_batch_tokens: the KV pool's positions (kv_cache_bytes, where given, sets them
        instead); longest_row: the positions of one row of the longest input and output (the pool is never clamped
        below it). memory: the device's figures (default: measured, with memory_limit_bytes in place of the device's
        limit where given). static_step: decoding steps with static shapes (static_step.py): "eager" or "cuda-
        graphs"; None: the paged step (shapes of the batch's own). gather_joins: under load, rows wait up to one
        prefill's duration to join together (plan.py). A model the serving loop cannot decode stops
        start-up (ModelLoadError naming its type and the supported ones)."""
        check_model(store.inventory, loaded.model)
        check_loop_supported(loaded.model, loaded.is_seq2seq)
        if (cache.device, cache.dtype) != (torch.device(loaded.device), loaded.dtype):
            raise ValueError(f"the adapter cache holds {cache.dtype} on {cache.device}, the model runs {loaded.dtype} "
                             f"on {loaded.device}: make it AdapterCache(capacity, loaded.device, loaded.dtype)")
        self.loaded = loaded
        self.store = store
        self.cache = cache
        self.eos_ids = eos_token_ids(loaded.model)
        self.arrow = ArrowLibraries(loaded.device, loaded.dtype)  # Arrow's libraries (zero-shot routing per token)
        self._arrow_adapters: dict[ArrowKey, ArrowAdapter] = {}
        self._arrow_lock = threading.Lock()
        # the running batch's adapters stay in place between steps: one pool position per row
        self.slots = AdapterSlots(loaded.model, store.inventory.module_names, pool_rows=max_batch_size)
        if kv_cache_bytes is not None:
            max_batch_tokens = max(kv_cache_bytes // kv_bytes_per_position(loaded.model.config, loaded.dtype), 1)
        demands = self._demands(max_batch_size, max_batch_tokens, longest_row, prepack_weights, merge_single_task)
        if memory is None:  # measured: weights the loader memory-mapped must count as held
            make_resident(loaded.model)
            memory = measure(loaded.device, memory_limit_bytes)
        self.memory = plan_memory(memory, memory_fraction, demands, _weights_bytes(loaded))
        log.info("%s", self.memory.table())
        cache.resize(self.memory.cache_bytes)
        if self.memory.skills_on_device:
            store.keep_skills_on(loaded.device)
        self.merge_single_task = self.memory.merge  # single-task batches on merged weights
        self.prepacked = self.memory.prepack and self._prepack(max_batch_size, every_layer=prepack_weights is True)
        avoid_per_length_attention_plans(loaded.device)
        batch = RunningBatch(self._paged_kv(kv_block_size, prefix_cache, static_step), self.slots, eos_ids=self.eos_ids,
                             merge_single_task=self.merge_single_task,
                             decoder_start=loaded.model.config.decoder_start_token_id if loaded.is_seq2seq else None,
                             prefill_chunk=prefill_chunk)
        batch.route_prompts = lambda rows: arrow_prompt.route_rows(self.loaded, self.slots, rows)
        self.loop = Scheduler(batch, Policy(max_rows=max_batch_size, gather_joins=gather_joins),
                              resolve=self.adapters_and_keys, score_chunk=self._score_chunk,
                              make_rows=RowMaker(loaded.tokenizer, self.eos_ids, max_batch_size))

    def _paged_kv(self, block_size: int, prefix_cache: bool, static_step: str | None) -> PagedKV:
        """The KV pool the memory plan reserved, its block manager, and the model's attention pointed at it."""
        m = self.loaded
        pool = KVPool.for_model(m.model.config, self.memory.kv_positions, block_size, m.dtype, m.device,
                                zeroed=static_step is not None)
        install(m.model, m.is_seq2seq)
        static = None
        if static_step is not None:
            static = StaticDecode(m.model, m.is_seq2seq, pool, torch.device(m.device), m.tokenizer.pad_token_id,
                                  static_step, self.slots.layout)
        return PagedKV(m.model, m.is_seq2seq, m.device, pool, BlockManager(pool.blocks, block_size,
                                                                              prefix_cache=prefix_cache),
                       m.tokenizer.pad_token_id, static)

    def _demands(self, rows: int, positions: int, longest_row: int, prepack: bool | None, merge: bool | None
                 ) -> Demands:
        m = self.loaded
        dtype_bytes = torch.empty((), dtype=m.dtype).element_size()
        adapter_bytes = sum((d_in + d_out) * self.store.inventory.config.r * dtype_bytes
                            for d_in, d_out in self.store.inventory.module_shapes.values())
        packable = prepack_supported(m.device, m.dtype)
        return Demands(
            pool_bytes=rows * adapter_bytes, kv_bytes_per_position=kv_bytes_per_position(m.model.config, m.dtype),
            kv_positions=positions, min_kv_positions=longest_row, cache_bytes=self.cache.capacity_bytes,
            prepack_bytes=self.slots.bytes_to_pack(every_layer=prepack is True) if packable else None,
            prepack_wanted=prepack, merge_bytes=self.slots.bytes_to_merge(), merge_wanted=merge,
            skills_bytes=self.store.inventory.skills_nbytes if torch.device(m.device).type != "cpu" else 0)

    def _prepack(self, rows_hint: int, *, every_layer: bool) -> bool:
        """Pack the planned layers; where this CPU cannot after all (bf16 without AVX-512), off — or a start-up
        error if it was asked for."""
        if self.slots.prepack(rows_hint, every_layer=every_layer) > 0:
            return True
        if every_layer:
            raise ModelLoadError(f"prepack_weights: oneDNN cannot pack {self.loaded.dtype} weights on "
                                 f"{self.loaded.device} here; leave it unset (auto) or set it to false")
        return False

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    # ---- adapters ---------------------------------------------------------------------------
    def adapter(self, task: TaskRef) -> TaskAdapter:
        """The task's adapter on the engine's device and dtype; routed at most once per version."""
        return self.adapters_and_keys([task])[0][0]

    def adapters_and_keys(self, tasks: Sequence[TaskRef | ArrowSpec]) -> tuple[list[TaskAdapter], list[Hashable]]:
        """Each task's adapter and the cache key that names its content. Misses are routed together (one
        pass over the inventory). Consistent even if a new version of a task lands meanwhile: then the
        entry, possibly routed from the newer version, is dropped and redone. An Arrow route's adapter is an
        ArrowAdapter (arrow_rows.py), keyed by its library's content and the route."""
        if any(isinstance(t, ArrowSpec) for t in tasks):
            return self._with_arrow(tasks)
        while True:
            keys = [self.store.cache_key(task) for task in tasks]
            task_of = dict(zip(keys, tasks, strict=True))
            adapters = self.cache.get_many(keys, lambda missing, task_of=task_of: self.store.adapters(
                [task_of[k] for k in missing], device=self.loaded.device))
            stale = {key for key, task in zip(keys, tasks, strict=True) if self.store.cache_key(task) != key}
            if not stale:
                return adapters, keys
            self.cache.discard(lambda key, stale=stale: key in stale)

    def _with_arrow(self, tasks: Sequence[TaskRef | ArrowSpec]) -> tuple[list[TaskAdapter], list[Hashable]]:
        plain = [t for t in tasks if not isinstance(t, ArrowSpec)]
        found: dict = {}
        if plain:
            adapters, keys = self.adapters_and_keys(plain)
            found.update(zip(plain, zip(adapters, keys, strict=True), strict=True))
        for spec in dict.fromkeys(t for t in tasks if isinstance(t, ArrowSpec)):
            adapter = self.arrow_adapter(spec)
            found[spec] = (adapter, adapter.key)
        return [found[t][0] for t in tasks], [found[t][1] for t in tasks]

    def arrow_adapter(self, spec: ArrowSpec) -> ArrowAdapter:
        """The adapter of Arrow rows routed by `spec`: the library now (built once per inventory and, over tasks,
        per set of task versions) on the engine's device and dtype."""
        library = self.arrow.get(self.store, spec.over)
        key = ArrowKey(library.key, spec)
        with self._arrow_lock:
            adapter = self._arrow_adapters.get(key)
            if adapter is None:
                kept = [(k, a) for k, a in self._arrow_adapters.items()
                        if k.library == library.key or k.spec.over != spec.over]  # a stale library's routes go
                self._arrow_adapters = dict(kept[-(MAX_ARROW_ROUTES - 1):])  # each holds a copy of its library
                adapter = self._arrow_adapters[key] = ArrowAdapter.of(library, spec)
            return adapter

    def check_arrow(self, spec: ArrowSpec) -> None:
        """ArrowError naming the field if this store cannot serve the route (e.g. top_k over its experts)."""
        self.arrow.check(self.store, spec)

    def explain(self, spec: ArrowSpec, text: str) -> RouteExplanation:
        """Arrow's routing of one input: per layer that reads the prompt, each expert's weight averaged over the
        prompt's tokens, and that averaged over those layers (the same summary a /generate response holds)."""
        return self.explain_many(spec, [text])[0]

    def explain_many(self, spec: ArrowSpec, texts: Sequence[str]) -> list[RouteExplanation]:
        """`explain` for each text: one prefill each, between the loop's iterations (the running batch's layers are
        re-pointed after). A route fixed once per request: each layer's fixed mix, from one routing pass."""
        adapter = self.arrow_adapter(spec)
        prompts = [self.token_ids(text) for text in texts]
        m = self.loaded

        def once() -> list[RouteExplanation]:
            routes = arrow_prompt.route_prompts(m, self.slots, adapter, prompts)
            return [RouteExplanation(adapter.library.experts,
                                     {name: adapter.experts_weights(w) for name, w in route.layers.items()},
                                     adapter.experts_weights(route.average())) for route in routes]

        def one(ids: list[int]) -> RouteExplanation:
            input_ids = torch.tensor([ids], dtype=torch.long, device=m.device)
            mask = torch.ones_like(input_ids)
            recorder = arrow_rows.RoutingRecorder(mask.cpu())
            recorder.keep_layers = True
            with self.slots.activate([None]):
                arrow_rows.attach(self.slots, [adapter], recorder=recorder)
                with torch.inference_mode():
                    arrow_prompt.prompt_forward(m, input_ids, mask)
            layers = {name: adapter.experts_weights(rows[0]) for name, rows in recorder.per_layer.items()}
            return RouteExplanation(adapter.library.experts, layers, adapter.experts_weights(recorder.average(0)))

        if spec.granularity == "prompt":
            return self.loop.call(once)
        return self.loop.call(lambda: [one(ids) for ids in prompts])

    def forget_task(self, name: str) -> int:
        """Drop every cached adapter of a task (all versions), and of mixes holding it; return how many. Rows
        already running keep the adapter they were admitted with; new rows route the task's current version."""
        return self.cache.discard(lambda key: _mentions(key, name))

    # ---- generation and scoring -----------------------------------------------------------------
    def submit_generate(self, rows: Sequence[GenerateRow]) -> GenerateJob:
        """Queue rows for the serving loop; the job's future gets the completions in row order."""
        return self.loop.submit_generate(GenerateJob(rows))

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]:
        """Rows may mix tasks and sampling parameters (blocks until every row has ended)."""
        self._not_on_loop("generate")
        return self.submit_generate(rows).future.result()

    def generate_with(self, adapters: Sequence[TaskAdapter], rows: Sequence[GenerateRow]) -> list[Completion]:
        """Generate with explicit adapters, one per row (e.g. an adapter still being trained)."""
        for row, adapter in zip(rows, adapters, strict=True):
            row.adapter = adapter.to(self.loaded.device, self.loaded.dtype)
        return self.generate(rows)

    def _score_chunk(self, pairs: list[tuple]) -> list[tuple[float, int]]:
        """One /score forward on the loop thread: [(text, choice, adapter, key)] -> [(log-likelihood, tokens)];
        one adapter runs merged where the running batch is empty (it would re-point the layers anyway). A route fixed
        once per request is fixed from each pair's text."""
        pairs = arrow_prompt.route_pairs(self.loaded, self.slots, pairs, self.token_ids)
        adapters = [adapter for _, _, adapter, _ in pairs]
        single = len({id(a) for a in adapters}) == 1
        arrow = arrow_rows.has_arrow(adapters)
        merge = single and not len(self.loop.batch) and self.merge_single_task and not arrow \
            and self.slots.merge_pays(pairs[0][3], len(pairs))  # one forward: a row-step per pair
        m = self.loaded
        with self.slots.activate(adapters, key=pairs[0][3], merge=merge):
            if arrow:
                arrow_rows.attach(self.slots, adapters)
            return score_pairs(m.model, m.tokenizer, m.is_seq2seq, m.device, [p[0] for p in pairs],
                               [p[1] for p in pairs])

    def submit_score(self, rows: Sequence[ScoreRow]) -> ScoreJob:
        return self.loop.submit_score(ScoreJob(rows))

    def score(self, rows: Sequence[ScoreRow]) -> list[list[ChoiceLogprob]]:
        """Every (row, choice) pair's log-likelihood, each pair with its row's task adapter."""
        self._not_on_loop("score")
        return [scored.choices for scored in self.submit_score(rows).future.result()]

    def prompt_logprobs(self, task: TaskRef, prompts: list[list[int]], top_k: int) -> list[list[TokenLogprob]]:
        """Causal LMs (OpenAI's echo with logprobs): per prompt, per token, log P(token | the tokens before it) and
        the top_k most likely tokens, with the task's adapter. In chunks of the batch's row limit, one teacher-forced
        forward each between the loop's iterations (as /score's chunks), so generation goes on in between. A
        seq2seq model's prompt is its encoder's input, which it does not predict: ValueError."""
        self._not_on_loop("prompt_logprobs")
        if self.loaded.is_seq2seq:
            raise ValueError("a seq2seq model's prompt is its encoder's input: it has no log-probabilities")
        chunk = self.loop.policy.max_rows
        out: list[list[TokenLogprob]] = []
        for start in range(0, len(prompts), chunk):
            out += self.loop.call(lambda part=prompts[start: start + chunk]: self._prompt_chunk(task, part, top_k))
        return out

    def _prompt_chunk(self, task: TaskRef, prompts: list[list[int]], top_k: int) -> list[list[TokenLogprob]]:
        adapters, keys = self.adapters_and_keys([task])
        pad_id = self.tokenizer.pad_token_id or 0  # padding is masked: any id will do
        with self.slots.activate(adapters, key=keys[0]):
            return prompt_logprobs(self.model, self.loaded.device, prompts, top_k, pad_id)

    # ---- adaptation ---------------------------------------------------------------------------
    def train_step(self, make_adapter: Callable[[], TaskAdapter], batch: dict[str, torch.Tensor]) -> float:
        """One training step's forward and backward between the loop's iterations (it yields to generation):
        make_adapter() builds the differentiable adapter; gradients land on what it was built from."""
        def run() -> float:
            with torch.enable_grad():
                adapter = make_adapter().to(self.loaded.device, self.loaded.dtype)
                with self.slots.activate([adapter]):
                    loss = self.model(**batch).loss
                loss.backward()
            return loss.item()

        return self.loop.call(run, background=True)

    def loss(self, adapter: TaskAdapter, batch: dict[str, torch.Tensor]) -> float:
        """The model's loss on a batch with an explicit adapter, no gradients."""
        def run() -> float:
            with torch.no_grad(), self.slots.activate([adapter.to(self.loaded.device, self.loaded.dtype)]):
                return self.model(**batch).loss.item()

        return self.loop.call(run)

    # ---- misc ---------------------------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def stats(self) -> LoopStats:
        return self.loop.stats()

    def warm_up(self) -> None:
        """Route the μ adapter once and run one tiny generation, so the first request is not slow."""
        self.generate([GenerateRow("__mu__", "warm up", _WARM_UP)])

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish submitted work (up to timeout_s) and stop the serving loop."""
        self.loop.stop(timeout_s)

    def _not_on_loop(self, what: str) -> None:
        if self.loop.on_loop_thread():
            raise RuntimeError(f"engine.{what}() waits for the serving loop: call it from another thread")


_WARM_UP = SamplingParams(max_new_tokens=2)


@dataclass(frozen=True)
class RouteExplanation:
    """Arrow's routing of one input: per layer that read the prompt and overall, each expert's mean weight."""

    experts: tuple[str, ...]
    layers: dict[str, dict[str, float]]
    average: dict[str, float]


def _mentions(key: AdapterKey, name: str) -> bool:
    return key.task == name or any(_mentions(member, name) for member, _ in key.members)


def _weights_bytes(loaded: LoadedModel) -> int:
    return sum(t.nbytes for t in (*loaded.model.parameters(), *loaded.model.buffers()))
