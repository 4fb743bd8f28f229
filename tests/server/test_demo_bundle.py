"""The committed demo bundle: our engine equals PEFT's PeftModel with task_ids, and the adapters work."""

import copy

import pytest
import torch
from peft import PeftModel

from adapter_store import AdapterCache, AdapterStore
from demo.tasks import HELDOUT_TASKS, TRAIN_TASKS, examples
from server.engine import Engine, GenerateRow, SamplingParams, ScoreRow, load_model
from server.settings import DEMO_BUNDLE

GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    store = AdapterStore.open(DEMO_BUNDLE / "inventory", tmp_path_factory.mktemp("adapted"))
    engine = Engine(load_model(DEMO_BUNDLE / "model", device="cpu"), store, AdapterCache(2**28))
    base = load_model(DEMO_BUNDLE / "model", device="cpu").model
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(DEMO_BUNDLE / "inventory")).eval()
    return engine, peft_model


def test_mixed_batch_greedy_equals_peft(demo):
    engine, peft_model = demo
    tasks = TRAIN_TASKS[:6]
    pairs = [(t, x) for t in tasks for x, _ in examples(t, 2, seed=11)]
    ours = [c.text for c in engine.generate([GenerateRow(t, x, GREEDY) for t, x in pairs])]
    rows = {name: info.row for name, info in ((t, engine.store.task(t)) for t in tasks)}
    batch = engine.tokenizer([x for _, x in pairs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = peft_model.generate(**batch, task_ids=torch.tensor([rows[t] for t, _ in pairs]), max_new_tokens=24,
                                  do_sample=False)
    assert ours == engine.tokenizer.batch_decode(out, skip_special_tokens=True)


def test_routed_adapters_do_their_task_and_mu_does_not(demo):
    engine, _ = demo
    pairs = [(t, x, y) for t in TRAIN_TASKS[::3] for x, y in examples(t, 5, seed=12)]
    routed = engine.generate([GenerateRow(t, x, GREEDY) for t, x, _ in pairs])
    mu = engine.generate([GenerateRow("__mu__", x, GREEDY) for _, x, _ in pairs])
    routed_hits = sum(o.text == y for o, (_, _, y) in zip(routed, pairs, strict=True))
    mu_hits = sum(o.text == y for o, (_, _, y) in zip(mu, pairs, strict=True))
    assert routed_hits >= 0.7 * len(pairs) and routed_hits > mu_hits + 0.5 * len(pairs)


def test_score_prefers_the_right_answer(demo):
    engine, _ = demo
    (text, answer), = examples(TRAIN_TASKS[0], 1, seed=13)
    wrong = examples(HELDOUT_TASKS[0], 1, seed=13)[0][1]
    result = engine.score([ScoreRow(TRAIN_TASKS[0], text, [wrong, answer, answer[::-1] + "x"])])[0]
    assert max(result, key=lambda s: s.logprob_sum).choice == answer
