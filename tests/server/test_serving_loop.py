"""The serving loop (continuous batching) through the engine's public operations: rows that join a running
batch at different steps and rows that leave early each equal the row run alone and PEFT's own Poly forward,
for T5 (ReLU and gated FFN) and Llama with grouped-query attention; per-row sampling; what interleaves."""

import contextlib
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

from adapter_store import AdapterCache, AdapterStore
from server.adapt import METHODS
from server.adapt.data import Example, make_batch
from server.engine import Engine, GenerateRow, SamplingParams, ScoreRow, load_model
from tests.factories import engine_for, save_bundle

TEXTS = ["hello there", "abc", "a much longer input text", "xyz!", "mid"]


@pytest.fixture(scope="module", params=["t5", "t5-gated", "llama"])
def bundle(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    _, peft_model = save_bundle(folder, request.param)
    engine = engine_for(folder)
    yield request.param, folder, peft_model, engine
    engine.close()


def peft_greedy(peft_model, tokenizer, kind, text, task_id, max_new_tokens):
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(**batch, task_ids=torch.tensor([task_id]), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = out if kind.startswith("t5") else out[:, batch["input_ids"].shape[1]:]
    return tokenizer.decode(out[0], skip_special_tokens=True)


def staggered(engine: Engine, rows: list[GenerateRow], after_pieces: int = 2) -> list:
    """Run rows[0] alone; each next row is submitted when the one before it has streamed `after_pieces` pieces
    (from the loop's own thread: so it joins a batch that is mid-generation). Returns each row's completion."""
    jobs = [None] * len(rows)
    seen = [0] * len(rows)

    def chain(i):
        def on_text(_piece):
            seen[i] += 1
            if seen[i] == after_pieces and i + 1 < len(rows):
                jobs[i + 1] = engine.submit_generate([rows[i + 1]])
                rows[i + 1].on_text = chain(i + 1)
        return on_text

    rows[0].on_text = chain(0)
    jobs[0] = engine.submit_generate([rows[0]])
    results = [jobs[0].future.result(timeout=120)[0]]
    for i in range(1, len(rows)):
        deadline = time.monotonic() + 120
        while jobs[i] is None and time.monotonic() < deadline:  # not every row streams enough to start the next
            if jobs[i - 1].future.done():
                jobs[i] = engine.submit_generate([rows[i]])
            time.sleep(0.001)
        results.append(jobs[i].future.result(timeout=120)[0])
    return results


def test_rows_joining_mid_generation_equal_each_row_alone_and_peft(bundle):
    kind, _, peft_model, engine = bundle
    tasks = [0, 2, 1, 0, 2]
    limits = [12, 4, 10, 7, 12]  # rows leave early on their own limit while others go on
    rows = [GenerateRow(f"task-{t}", x, SamplingParams(max_new_tokens=n)) for t, x, n in zip(tasks, TEXTS, limits,
                                                                                            strict=True)]
    joined = staggered(engine, rows)
    alone = [engine.generate([GenerateRow(r.task, r.text, r.params)])[0] for r in rows]
    assert [c.text for c in joined] == [c.text for c in alone]
    for row, t, n, completion in zip(rows, tasks, limits, joined, strict=True):
        assert completion.text == peft_greedy(peft_model, engine.tokenizer, kind, row.text, t, n)
        assert completion.completion_tokens <= n
    assert len({c.text for c in joined}) > 1
    assert engine.stats().running_rows == 0



def test_rows_leaving_at_a_stop_string_and_end_of_sequence_do_not_disturb_the_others(bundle):
    _, _, _, engine = bundle
    candidates = [(f"task-{t}", x) for t in (1, 2, 0) for x in TEXTS]
    outputs = engine.generate([GenerateRow(t, x, SamplingParams(max_new_tokens=12)) for t, x in candidates])
    (task, text), full = next((c, o) for c, o in zip(candidates, outputs, strict=True) if len(o.text) >= 4)
    stop = full.text[1:3]
    rows = [GenerateRow("task-0", TEXTS[0], SamplingParams(max_new_tokens=12)),
            GenerateRow(task, text, SamplingParams(max_new_tokens=12, stop=(stop,))),
            GenerateRow("task-2", TEXTS[2], SamplingParams(max_new_tokens=12))]
    together = engine.generate(rows)
    cut = together[1]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens  # it stopped decoding, not only its text
    for row, completion in zip(rows[::2], together[::2], strict=True):
        assert completion.text == engine.generate([GenerateRow(row.task, row.text, row.params)])[0].text


def test_greedy_and_sampled_rows_in_one_batch(bundle):
    _, _, _, engine = bundle
    greedy = SamplingParams(max_new_tokens=8)
    sampled = [SamplingParams(max_new_tokens=8, do_sample=True, temperature=t, top_k=k, top_p=p, seed=s)
               for t, k, p, s in [(1.5, 0, 1.0, 1), (0.7, 5, 1.0, 2), (2.0, 0, 0.9, 3)]]
    rows = [GenerateRow("task-0", TEXTS[0], greedy), *[GenerateRow("task-1", x, p) for x, p in zip(TEXTS[1:], sampled,
                                                                                                   strict=False)]]
    together = engine.generate(rows)
    for row, completion in zip(rows, together, strict=True):
        alone = engine.generate([GenerateRow(row.task, row.text, row.params)])[0]
        assert completion.text == alone.text  # seeded rows draw from their own generator


def test_min_new_tokens_and_ignore_eos(bundle):
    _, _, _, engine = bundle
    free = engine.generate([GenerateRow("task-0", "abc", SamplingParams(max_new_tokens=16))])[0]
    forced = engine.generate([GenerateRow("task-0", "abc", SamplingParams(max_new_tokens=16, ignore_eos=True))])[0]
    assert forced.completion_tokens == 16 and forced.finish_reason == "length"
    at_least = engine.generate([GenerateRow("task-0", "abc", SamplingParams(max_new_tokens=16, min_new_tokens=10))])[0]
    assert at_least.completion_tokens >= 10
    if free.finish_reason == "stop":
        assert free.completion_tokens < 16


def test_many_joins_and_leaves_leave_nothing_running(bundle):
    _, _, _, engine = bundle
    rng = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(40):
        n = int(torch.randint(1, 14, (1,), generator=rng))
        params = SamplingParams(max_new_tokens=n, do_sample=bool(i % 3 == 0), seed=i, ignore_eos=bool(i % 4 == 0))
        jobs.append(engine.submit_generate([GenerateRow(f"task-{i % 3}", TEXTS[i % len(TEXTS)], params)]))
        if i % 7 == 0:
            jobs[-1].cancel()
    for job in jobs:
        with contextlib.suppress(CancelledError):  # the cancelled ones
            job.future.result(timeout=120)
    deadline = time.monotonic() + 10
    while engine.stats().running_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = engine.stats()
    assert stats.running_rows == 0 and stats.waiting_rows == 0
    assert engine.loop.batch.kv.blocks.used == 0  # every block back: free, or cached for a prefix


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_a_pool_of_a_few_blocks_preempts_rows_and_answers_every_request(tmp_path, kind):
    save_bundle(tmp_path, kind)
    # 128 positions: 10 blocks of 16 (scratch and rounding included); three rows start, and cannot all grow to 40
    engine = engine_for(tmp_path, max_batch_tokens=128)
    rows = [GenerateRow(f"task-{i % 3}", TEXTS[i % len(TEXTS)], SamplingParams(max_new_tokens=40, ignore_eos=True))
            for i in range(8)]
    done = engine.generate(rows)
    assert engine.loop.batch.preemptions > 0
    assert all(c.completion_tokens == 40 for c in done)
    roomy = engine_for(tmp_path)
    assert [c.text for c in done] == [c.text for c in roomy.generate(rows)]  # recomputed rows decode the same
    assert engine.loop.batch.kv.blocks.used == 0
    roomy.close()
    engine.close()


def test_score_and_training_steps_run_while_a_long_generation_is_decoding(tmp_path):
    save_bundle(tmp_path, "t5", sharp=False)
    engine = engine_for(tmp_path)
    long = engine.submit_generate([GenerateRow("task-0", "long", SamplingParams(max_new_tokens=400, ignore_eos=True))])
    while engine.stats().running_rows == 0:
        time.sleep(0.001)
    scored = engine.score([ScoreRow("task-1", "question", ["yes", "no"])])
    assert not long.future.done(), "the score waited for the whole generation"
    method = METHODS["mhr-z"](engine.store)
    batch = make_batch(engine.tokenizer, True, [Example("abc", "cba")], "cpu")
    loss = engine.train_step(method.adapter, batch)
    assert not long.future.done(), "the training step waited for the whole generation"
    assert loss > 0 and all(p.grad is not None for p in method.params)
    assert len(scored[0]) == 2 and scored[0][0].logprob_sum != scored[0][1].logprob_sum
    assert long.future.result(timeout=120)[0].completion_tokens == 400
    engine.close()


def test_beam_search_runs_step_by_step_beside_the_loop(tmp_path):
    save_bundle(tmp_path, "t5")
    engine = engine_for(tmp_path)
    beams = engine.submit_generate([GenerateRow("task-0", "beams", SamplingParams(max_new_tokens=200, num_beams=4,
                                                                                  ignore_eos=True))])
    time.sleep(0.05)
    short = engine.generate([GenerateRow("task-1", "short", SamplingParams(max_new_tokens=3))])
    assert not beams.future.done(), "the short request waited for the whole beam search"
    assert short[0].completion_tokens <= 3
    assert beams.future.result(timeout=120)[0].completion_tokens == 200
    engine.close()


def test_merge_off_gives_the_same_text(tmp_path):
    save_bundle(tmp_path, "t5")
    rows = [GenerateRow(f"task-{i % 3}", x, SamplingParams(max_new_tokens=8)) for i, x in enumerate(TEXTS)]
    texts = []
    for options in ({}, {"merge_single_task": False}):
        engine = engine_for(tmp_path, **options)
        texts.append([c.text for c in engine.generate(rows)] + [engine.generate(rows[:1])[0].text])
        engine.close()
    assert texts[0] == texts[1]


def test_a_row_keeps_the_adapter_version_it_was_admitted_with(tmp_path):
    save_bundle(tmp_path, "t5", sharp=False, printable=True)  # streams a character per step
    engine = engine_for(tmp_path)
    store = engine.store
    width = store.inventory.config.n_splits * store.inventory.config.n_skills
    gen = torch.Generator().manual_seed(3)

    def save(version_seed):
        torch.manual_seed(version_seed)
        return store.save_routing("mine", "mhr-z", [torch.randn(len(g.names), width, generator=gen) * 3
                                                    for g in store.inventory.groups])

    save(1)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    started = threading.Event()
    row = GenerateRow("mine", "probe", params, on_text=lambda _: started.set())
    first = engine.submit_generate([row])
    assert started.wait(60)
    save(2)
    assert not first.future.done()  # version 2 landed while the row was decoding
    engine.forget_task("mine")
    old = first.future.result(timeout=120)[0]
    new = engine.generate([GenerateRow("mine", "probe", params)])[0]
    assert (old.version, new.version) == (1, 2) and old.text != new.text
    fresh = engine_for(tmp_path)  # a new server on version 2
    assert fresh.generate([GenerateRow("mine", "probe", params)])[0].text == new.text
    fresh.close()
    engine.close()


def test_a_model_the_loop_cannot_serve_stops_start_up_naming_its_type(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration, MistralConfig, MistralForCausalLM

    from server.engine.loader import ModelLoadError
    from server.engine.model_support import check_loop_supported
    from tests.factories import tiny_llama, tiny_t5

    check_loop_supported(tiny_t5(), True)
    check_loop_supported(tiny_llama(), False)
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    with pytest.raises(ModelLoadError, match="MistralForCausalLM.*'mistral'.*supported: seq2seq models of type t5"):
        check_loop_supported(sliding, False)  # a sliding window keeps state that padding would corrupt
    bart = BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(ModelLoadError, match="BartForConditionalGeneration"):
        check_loop_supported(bart, True)  # absolute positions: right-aligned padding would shift them


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def test_memory_returns_after_many_joins_and_leaves(tmp_path):
    save_bundle(tmp_path, "t5", sharp=False)
    engine = engine_for(tmp_path, max_batch_size=8)
    rng = torch.Generator().manual_seed(1)

    def wave():
        lengths = torch.randint(1, 40, (120,), generator=rng).tolist()
        jobs = [engine.submit_generate([GenerateRow(f"task-{i % 3}", TEXTS[i % len(TEXTS)] * (1 + i % 3),
                                                    SamplingParams(max_new_tokens=n, ignore_eos=True))])
                for i, n in enumerate(lengths)]
        for job in jobs:
            job.future.result(timeout=120)

    wave()  # caches, pools and allocator arenas reach their working size
    after_first = resident_mb()
    for _ in range(3):
        wave()
    assert engine.stats().running_rows == 0 and engine.loop.batch.kv.blocks.used == 0
    assert resident_mb() - after_first < 30, "memory kept growing with more joins and leaves"
    engine.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_with_a_layer_kept_in_float32(tmp_path, dtype):
    """Under half precision transformers keeps T5's wo in float32 (its inputs come in float32): its adapters follow."""
    save_bundle(tmp_path, "t5")
    loaded = load_model(tmp_path / "model", device="cpu", dtype=dtype)
    wo = loaded.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)
    half = Engine(loaded, AdapterStore.open(tmp_path / "inventory"), AdapterCache(10**8, loaded.device, loaded.dtype))
    full = engine_for(tmp_path)
    rows = [ScoreRow("task-0", "some input", ["yes", "no"]), ScoreRow("task-2", "other", ["maybe"])]
    for ours, ref in zip(half.score(rows), full.score(rows), strict=True):
        assert [c.logprob_sum for c in ours] == pytest.approx([c.logprob_sum for c in ref], rel=1e-2)
    mixed = [GenerateRow(f"task-{i}", x, SamplingParams(max_new_tokens=6)) for i, x in enumerate(TEXTS[:3])]
    assert all(c.completion_tokens <= 6 for c in half.generate(mixed))
    half.close()
    full.close()


def test_a_failing_forward_fails_its_requests_and_the_loop_goes_on(tmp_path, monkeypatch):
    from server.engine import engine as engine_module
    from server.engine.paged_kv import PagedKV

    save_bundle(tmp_path, "t5")
    engine = engine_for(tmp_path)
    real_score, real_step = engine_module.score_pairs, PagedKV.decode
    monkeypatch.setattr(engine_module, "score_pairs", lambda *a: (_ for _ in ()).throw(RuntimeError("score broke")))
    with pytest.raises(RuntimeError, match="score broke"):
        engine.score([ScoreRow("task-0", "x", ["y"])])
    monkeypatch.setattr(engine_module, "score_pairs", real_score)
    monkeypatch.setattr(PagedKV, "decode",
                        lambda self, rows, tokens, **_: (_ for _ in ()).throw(RuntimeError("step broke")))
    with pytest.raises(RuntimeError, match="step broke"):
        engine.generate([GenerateRow("task-0", "x", SamplingParams(max_new_tokens=4))])
    monkeypatch.setattr(PagedKV, "decode", real_step)
    assert engine.generate([GenerateRow("task-0", "x", SamplingParams(max_new_tokens=4))])[0].completion_tokens <= 4
    assert len(engine.score([ScoreRow("task-0", "x", ["y"])])[0]) == 1
    engine.close()


def test_a_shared_prefix_is_computed_once_per_adapter_version_and_decodes_the_same(tmp_path):
    save_bundle(tmp_path, "llama")
    engine, uncached = engine_for(tmp_path), engine_for(tmp_path, prefix_cache=False)
    blocks = engine.loop.batch.kv.blocks
    prefix = "a system prompt shared by many requests, " * 2  # 84 bytes: 5 full blocks of 16 with the BOS
    params = SamplingParams(max_new_tokens=6)
    first = [GenerateRow("task-0", prefix + "first", params)]
    second = [GenerateRow("task-0", prefix + "second", params)]
    assert engine.generate(first)[0].text == uncached.generate(first)[0].text and blocks.prefix_hits == 0
    assert engine.generate(second)[0].text == uncached.generate(second)[0].text
    assert blocks.prefix_hits == 5
    engine.generate([GenerateRow("task-1", prefix + "second", params)])  # another task: its own blocks
    assert blocks.prefix_hits == 5

    store, width = engine.store, engine.store.inventory.config.n_splits * engine.store.inventory.config.n_skills
    torch.manual_seed(0)
    logits = [torch.randn(len(g.names), width) * 3 for g in store.inventory.groups]
    store.save_routing("mine", "mhr-z", logits)
    mine = [GenerateRow("mine", prefix + "x", params)]
    engine.generate(mine)
    hits = blocks.prefix_hits
    store.save_routing("mine", "mhr-z", [-z for z in logits], overwrite=True)  # version 2
    engine.forget_task("mine")
    again = engine.generate(mine)[0]
    assert blocks.prefix_hits == hits, "version 2 read blocks cached under version 1"
    fresh = engine_for(tmp_path, prefix_cache=False)
    assert again.version == 2 and again.text == fresh.generate(mine)[0].text
    assert engine.generate(mine)[0].text == again.text and blocks.prefix_hits == hits + 5  # v2's own blocks
    for e in (engine, uncached, fresh):
        e.close()


def test_a_long_prompt_is_prefilled_in_chunks_while_other_rows_decode_and_decodes_the_same(tmp_path):
    save_bundle(tmp_path, "llama")
    chunked, whole = engine_for(tmp_path, prefill_chunk=16), engine_for(tmp_path, prefill_chunk=None)
    long = GenerateRow("task-1", "a long prompt, many chunks of it " * 3, SamplingParams(max_new_tokens=8))
    short = GenerateRow("task-2", "short", SamplingParams(max_new_tokens=30, ignore_eos=True))
    batch, chunks_beside_decoding = chunked.loop.batch, []
    real_advance = batch.advance_prefill

    def advance():  # each chunk: how many rows were decoding beside it
        if batch.prefilling:
            chunks_beside_decoding.append(len(batch.rows))
        return real_advance()

    batch.advance_prefill = advance
    running = chunked.submit_generate([short])
    while chunked.stats().running_rows == 0:
        time.sleep(0.001)
    got = chunked.generate([long])[0]
    assert got.text == whole.generate([long])[0].text  # 100 tokens in 7 chunks: the same text
    assert running.future.result(timeout=60)[0].text == whole.generate([short])[0].text
    assert len(chunks_beside_decoding) == 7 and all(chunks_beside_decoding), "chunks did not interleave with decoding"
    assert chunked.loop.batch.kv.blocks.used == 0
    chunked.close()
    whole.close()
