"""The engine against PEFT's own Poly forward: greedy text, beam search, scores, mixed batches."""

import copy

import pytest
import torch

from adapter_store import AdapterCache, AdapterStore
from adapter_store.merge import merge_adapter
from server.engine import Engine, GenerateRow, SamplingParams, ScoreRow, load_model
from tests.factories import save_bundle

TEXTS = ["hello there", "abc", "a longer input text", "xyz!"]
GREEDY = SamplingParams(max_new_tokens=8)


def build_engine(folder):
    store = AdapterStore.open(folder / "inventory")
    return Engine(load_model(folder / "model", device="cpu"), store, AdapterCache(10**8))


@pytest.fixture(scope="module", params=["t5", "llama"])
def bundle(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    base, peft_model = save_bundle(folder, request.param)
    return request.param, folder, base, peft_model, build_engine(folder)


def _peft_generate(peft_model, tokenizer, kind, texts, task_ids, **kwargs):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = peft_model.generate(**batch, task_ids=torch.tensor(task_ids), max_new_tokens=8, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, **kwargs)
    if kind != "t5":
        out = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def test_greedy_mixed_batch_equals_peft_task_ids(bundle):
    kind, _, _, peft_model, engine = bundle
    tasks = [0, 1, 2, 1]
    rows = [GenerateRow(f"task-{t}", text, GREEDY) for t, text in zip(tasks, TEXTS, strict=True)]
    ours = [c.text for c in engine.generate(rows)]
    assert ours == _peft_generate(peft_model, engine.tokenizer, kind, TEXTS, tasks)
    assert len(set(ours)) > 1


def test_each_row_in_a_mixed_batch_equals_running_it_alone(bundle):
    _, _, _, _, engine = bundle
    rows = [GenerateRow(f"task-{i % 3}", text, GREEDY) for i, text in enumerate(TEXTS)]
    together = engine.generate(rows)
    alone = [engine.generate([row])[0] for row in rows]
    assert [c.text for c in together] == [c.text for c in alone]


def test_adapter_changes_the_output(bundle):
    _, _, _, _, engine = bundle
    texts = {engine.generate([GenerateRow(task, "same input", GREEDY)])[0].text
             for task in ("task-0", "task-1", "task-2", "__mu__")}
    assert len(texts) > 1


def test_beam_search_per_task_equals_merged_adapter(bundle):
    kind, _, base, _, engine = bundle
    beams = SamplingParams(max_new_tokens=8, num_beams=3)
    rows = [GenerateRow("task-1", TEXTS[0], beams), GenerateRow("task-2", TEXTS[1], beams)]
    ours = [c.text for c in engine.generate(rows)]
    for row, text in zip(rows, ours, strict=True):
        merged = copy.deepcopy(base)
        merge_adapter(merged, engine.store.adapter(row.task))
        batch = engine.tokenizer([row.text], return_tensors="pt")
        with torch.no_grad():
            out = merged.generate(**batch, max_new_tokens=8, num_beams=3, do_sample=False)
        out = out if kind == "t5" else out[:, batch["input_ids"].shape[1]:]
        assert text == engine.tokenizer.decode(out[0], skip_special_tokens=True)


def test_scores_equal_peft_log_likelihoods(bundle):
    kind, _, _, peft_model, engine = bundle
    rows = [ScoreRow("task-0", "question one", ["yes", "no"]), ScoreRow("task-2", "another", ["maybe", "no"])]
    ours = engine.score(rows)
    tok = engine.tokenizer
    for row, scores, task_id in zip(rows, ours, (0, 2), strict=True):
        for score in scores:
            expected = _peft_logprob(peft_model, tok, kind, row.text, score.choice, task_id)
            assert score.logprob_sum == pytest.approx(expected, abs=1e-3)
    assert ours[0][0].logprob_sum != ours[0][1].logprob_sum


def _peft_logprob(peft_model, tok, kind, text, choice, task_id):
    with torch.no_grad():
        if kind == "t5":
            enc = tok([text], return_tensors="pt")
            labels = tok([choice], return_tensors="pt")["input_ids"]
            logits = peft_model(**enc, labels=labels, task_ids=torch.tensor([task_id])).logits[0]
            return torch.log_softmax(logits, -1).gather(-1, labels[0, :, None]).sum().item()
        prompt = tok(text)["input_ids"]
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + cont])
        logits = peft_model(input_ids=ids, task_ids=torch.tensor([task_id])).logits[0]
        logprobs = torch.log_softmax(logits[:-1], -1)
        return sum(logprobs[len(prompt) - 1 + i, c].item() for i, c in enumerate(cont))


def test_stop_strings_and_token_limits(bundle):
    _, _, _, _, engine = bundle
    full = engine.generate([GenerateRow("task-0", "abc", SamplingParams(max_new_tokens=8))])[0]
    short = engine.generate([GenerateRow("task-0", "abc", SamplingParams(max_new_tokens=3))])[0]
    assert full.text.startswith(short.text) and short.completion_tokens <= 3
    if len(full.text) > 2:
        stop = full.text[1:3]
        cut = engine.generate([GenerateRow("task-0", "abc", SamplingParams(max_new_tokens=8, stop=(stop,)))])[0]
        assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_batches_that_reuse_resident_adapters_in_another_order_equal_running_alone(bundle):
    _, _, _, _, engine = bundle
    alone = {(t, x): engine.generate([GenerateRow(t, x, GREEDY)])[0].text
             for t in ("task-0", "task-1", "task-2", "__mu__") for x in TEXTS}
    batches = [["task-0", "task-1", "task-2", "__mu__"], ["__mu__", "task-2", "task-0", "task-1"],
               ["task-2", "task-2", "task-1", "task-0"], ["task-1", "__mu__", "task-1", "task-2"]]
    copies = engine.slots.pool.copies
    for tasks in batches:
        rows = [GenerateRow(t, x, GREEDY) for t, x in zip(tasks, TEXTS, strict=True)]
        assert [c.text for c in engine.generate(rows)] == [alone[(t, x)] for t, x in zip(tasks, TEXTS, strict=True)]
    assert engine.slots.pool.copies - copies < 4 * len(batches)  # some adapters stayed in place


def test_single_task_batches_that_alternate_tasks_each_use_their_own_merge(bundle):
    _, _, _, _, engine = bundle
    first = [engine.generate([GenerateRow(t, "same input", GREEDY)])[0].text for t in ("task-0", "task-1")]
    again = [engine.generate([GenerateRow(t, "same input", GREEDY)])[0].text
             for t in ("task-0", "task-0", "task-1", "task-1", "task-0")]
    assert again == [first[0], first[0], first[1], first[1], first[0]] and first[0] != first[1]


def test_scores_of_a_mixed_batch_come_back_in_input_order(bundle):
    _, _, _, _, engine = bundle
    rows = [ScoreRow(f"task-{i % 3}", text, ["yes", "no", "maybe"]) for i, text in enumerate(TEXTS)]
    together = engine.score(rows)
    alone = [engine.score([row])[0] for row in rows]
    for mixed, single in zip(together, alone, strict=True):
        assert [c.choice for c in mixed] == ["yes", "no", "maybe"]
        torch.testing.assert_close([c.logprob_sum for c in mixed], [c.logprob_sum for c in single],
                                   rtol=1e-5, atol=1e-3)


def test_seeded_sampling_of_a_mixed_batch_does_not_depend_on_what_ran_before(bundle):
    _, _, _, _, engine = bundle
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, temperature=2.0, seed=5)
    rows = [GenerateRow(f"task-{i % 3}", text, sampled) for i, text in enumerate(TEXTS)]
    first = [c.text for c in engine.generate(rows)]
    engine.generate([GenerateRow(t, "x", GREEDY) for t in ("task-2", "__mu__", "task-1", "task-0")])  # reshuffle
    assert [c.text for c in engine.generate(rows)] == first


def test_batches_larger_than_the_row_pool_run_on_their_own_stacks(bundle):
    _, folder, _, _, engine = bundle
    small = Engine(load_model(folder / "model", device="cpu"), engine.store, AdapterCache(10**8), max_batch_size=2)
    rows = [ScoreRow(f"task-{i % 3}", text, ["yes", "no"]) for i, text in enumerate(TEXTS)]  # 8 pairs > 2
    for ours, reference in zip(small.score(rows), engine.score(rows), strict=True):
        torch.testing.assert_close([c.logprob_sum for c in ours], [c.logprob_sum for c in reference],
                                   rtol=1e-5, atol=1e-3)
    assert small.slots.pool.copies == 0


def test_beam_search_in_a_mixed_batch_equals_each_row_alone(bundle):
    _, _, _, _, engine = bundle
    beams = SamplingParams(max_new_tokens=6, num_beams=2)
    rows = [GenerateRow(f"task-{(i + 1) % 3}", text, beams) for i, text in enumerate(TEXTS)]
    engine.generate([GenerateRow(t, "x", GREEDY) for t in ("task-2", "task-0", "task-1", "__mu__")])  # fill the pool
    together = [c.text for c in engine.generate(rows)]
    assert together == [engine.generate([row])[0].text for row in rows]


def test_an_adapter_cache_of_another_dtype_is_refused_at_construction(bundle):
    folder = bundle[1]
    store = AdapterStore.open(folder / "inventory")
    with pytest.raises(ValueError, match="adapter cache holds torch.bfloat16"):
        Engine(load_model(folder / "model", device="cpu"), store, AdapterCache(10**8, dtype=torch.bfloat16))


def test_base_task_is_the_backbone_alone_in_any_batch(bundle):
    """`__base__` serves the backbone with no adapter: alone (layers cleared) and beside adapted rows (zeros)."""
    kind, _, base, _, engine = bundle
    tokenizer = engine.tokenizer

    def plain(text):
        batch = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            out = base.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out = out if kind == "t5" else out[:, batch["input_ids"].shape[1]:]
        return tokenizer.decode(out[0], skip_special_tokens=True)

    alone = engine.generate([GenerateRow("__base__", TEXTS[0], GREEDY)])[0].text
    mixed = engine.generate([GenerateRow("task-1", TEXTS[1], GREEDY), GenerateRow("__base__", TEXTS[0], GREEDY)])
    assert alone == mixed[1].text == plain(TEXTS[0])
    assert mixed[0].text == engine.generate([GenerateRow("task-1", TEXTS[1], GREEDY)])[0].text
    with pytest.raises(Exception, match="nothing to export"):
        engine.store.export_lora("__base__", "/tmp/never-written")
