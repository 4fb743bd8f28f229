"""The start-up memory plan: optional copies only where they fit, in order; explicit requests that cannot fit
stop start-up naming the setting; limits clamped with a warning; a model under a fake limit still serves."""

import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LlamaConfig, T5Config, T5ForConditionalGeneration

from adapter_store import AdapterCache, AdapterStore
from server.app import build_engine, create_app
from server.engine import Engine, GenerateRow, SamplingParams, load_model
from server.engine import memory_plan as plan_module
from server.engine import prepack as prepack_module
from server.engine.memory_plan import (
    Demands,
    MemoryFigures,
    MemoryPlanError,
    kv_bytes_per_position,
    measure,
    plan_memory,
)
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings, metric, metric_values

MiB = 2**20


def demands(**overrides) -> Demands:
    values = dict(pool_bytes=10 * MiB, kv_bytes_per_position=1024, kv_positions=16384, min_kv_positions=800,
                  cache_bytes=100 * MiB, prepack_bytes=300 * MiB, prepack_wanted=None, merge_bytes=400 * MiB,
                  merge_wanted=None)
    return Demands(**{**values, **overrides})


def figures(free_mib: float, held_mib: float = 1000) -> MemoryFigures:
    """A device whose 0.9 budget leaves `free_mib` after `held_mib`."""
    return MemoryFigures(int((free_mib + held_mib) * MiB / 0.9) + 1, int(held_mib * MiB), "test")


def on(plan) -> dict[str, bool]:
    return {item.name: item.on for item in plan.items}


def test_everything_fits():
    plan = plan_memory(figures(2000), 0.9, demands(), weights_bytes=900 * MiB)
    assert on(plan) == {"row pool": True, "KV cache": True, "adapter cache": True, "prepacked weights": True,
                        "merge buffers": True}
    assert plan.kv_positions == 16384 and plan.cache_bytes == 100 * MiB and plan.prepack and plan.merge
    assert plan.planned_bytes <= plan.budget_bytes
    assert "prepacked weights" in plan.table() and plan.as_dict()["items"][0]["name"] == "row pool"


def test_skills_go_to_the_device_only_where_they_fit_after_everything_else():
    """A GPU's plan keeps a copy of the inventory's skills there (routing on the card) when it fits after the
    other copies; else it routes on the host. A CPU's (skills_bytes 0) has no such item."""
    everything = 10 + 16 + 100 + 300 + 400
    roomy = plan_memory(figures(everything + 50), 0.9, demands(skills_bytes=50 * MiB), weights_bytes=0)
    assert roomy.skills_on_device and on(roomy)["skills on device"] and roomy.planned_bytes <= roomy.budget_bytes
    short = plan_memory(figures(everything + 49), 0.9, demands(skills_bytes=50 * MiB), weights_bytes=0)
    assert not short.skills_on_device and not on(short)["skills on device"] and on(short)["merge buffers"]
    assert "routing on the host" in next(i.why for i in short.items if i.name == "skills on device")
    assert "skills on device" not in on(plan_memory(figures(everything), 0.9, demands(), weights_bytes=0))


@pytest.mark.parametrize(("free_mib", "merge_mib", "prepack", "merge"), [
    (10 + 16 + 100 + 300 + 400, 400, True, True),
    (10 + 16 + 100 + 300 + 399, 400, True, False),  # short: the merge buffers go first
    (10 + 16 + 100 + 299, 400, False, False),  # neither copy fits
    (10 + 16 + 100 + 299, 200, False, True),  # the prepacked weights do not fit, smaller merge buffers do
])
def test_optional_copies_are_switched_off_in_order_when_memory_is_short(free_mib, merge_mib, prepack, merge):
    plan = plan_memory(figures(free_mib), 0.9, demands(merge_bytes=merge_mib * MiB), weights_bytes=0)
    assert (plan.prepack, plan.merge) == (prepack, merge)
    assert plan.cache_bytes == 100 * MiB and plan.kv_positions == 16384  # the limits keep their full size
    off = [item for item in plan.items if not item.on]
    assert all("off (auto)" in item.why for item in off)


@pytest.mark.parametrize("setting", ["prepack_weights", "merge_single_task"])
def test_an_explicit_true_that_does_not_fit_stops_start_up_naming_the_setting(setting):
    wanted = {"prepack_wanted": True} if setting == "prepack_weights" else {"merge_wanted": True}
    with pytest.raises(MemoryPlanError, match=rf"{setting}=true: .* need [\d.]+ [GM]iB, but [\d.]+ [GM]iB is left"):
        plan_memory(figures(200), 0.9, demands(**wanted), weights_bytes=0)
    assert plan_memory(figures(2000), 0.9, demands(**wanted), weights_bytes=0).items[1].on  # granted right away


def test_an_explicit_true_for_an_impossible_copy_stops_start_up():
    with pytest.raises(MemoryPlanError, match="prepack_weights=true: .* not possible on this device"):
        plan_memory(figures(2000), 0.9, demands(prepack_bytes=None, prepack_wanted=True), weights_bytes=0)
    plan = plan_memory(figures(2000), 0.9, demands(prepack_bytes=None), weights_bytes=0)
    assert not plan.prepack and "not possible" in next(i.why for i in plan.items if i.name == "prepacked weights")


def test_cache_then_kv_are_clamped_with_a_warning(caplog):
    caplog.set_level(logging.WARNING)
    plan = plan_memory(figures(10 + 16 + 50), 0.9, demands(), weights_bytes=0)
    assert plan.kv_positions == 16384 and 49 * MiB < plan.cache_bytes < 51 * MiB
    assert "adapter cache clamped" in caplog.text and not (plan.prepack or plan.merge)
    plan = plan_memory(figures(10 + 8), 0.9, demands(), weights_bytes=0)
    assert 800 <= plan.kv_positions < 16384 and plan.cache_bytes == 0
    assert "max_batch_tokens clamped" in caplog.text


def test_a_row_pool_that_cannot_fit_stops_start_up():
    with pytest.raises(MemoryPlanError, match="max_batch_size: .*MHR_MAX_BATCH_SIZE"):
        plan_memory(figures(5), 0.9, demands(), weights_bytes=0)


def test_measured_figures_read_the_cgroup_limit_not_mem_available(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    monkeypatch.setattr(plan_module, "CGROUP_LIMITS", (tmp_path / "missing", limit))
    measured = measure(torch.device("cpu"))
    assert measured.limit_bytes == 2**30 and measured.source == "cgroup"
    assert measured.held_bytes > 0  # this process's resident memory
    limit.write_text("max\n")  # no limit: the machine's memory
    assert measure(torch.device("cpu")).source == "MemTotal"
    assert measure(torch.device("cpu"), limit_override=123).limit_bytes == 123


def test_kv_bytes_per_position_follow_the_architecture():
    t5 = T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=3, num_decoder_layers=2)
    assert kv_bytes_per_position(t5, torch.float32) == 2 * 2 * 4 * 8 * 4  # decoder layers, k+v, heads, d_kv, fp32
    llama = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    assert kv_bytes_per_position(llama, torch.bfloat16) == 3 * 2 * 2 * 8 * 2  # GQA: the key-value heads only


def test_a_model_whose_copies_exceed_a_fake_limit_still_serves_with_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(prepack_module, "MIN_PACKED_ELEMENTS", 0)  # the tiny model's layers are worth packing
    save_bundle(tmp_path, "t5")
    rows = [GenerateRow(f"task-{i % 3}", x, SamplingParams(max_new_tokens=8)) for i, x in enumerate(["ab", "cde"])]

    def engine(memory):
        return Engine(load_model(tmp_path / "model", device="cpu"), AdapterStore.open(tmp_path / "inventory"),
                      AdapterCache(512 * MiB), memory=memory)

    roomy = engine(None)
    assert roomy.prepacked and roomy.merge_single_task
    copies = roomy.memory.items[-1].bytes + roomy.memory.items[-2].bytes
    needed = sum(item.bytes for item in roomy.memory.items if item.name in ("row pool", "KV cache"))
    tight = engine(MemoryFigures(int((needed + 64 * 1024) / 0.9), 0, "test"))  # less room than the copies take
    assert copies > 64 * 1024
    assert not tight.prepacked and not tight.merge_single_task and tight.cache.capacity_bytes < 512 * MiB
    assert [c.text for c in tight.generate(rows)] == [c.text for c in roomy.generate(rows)]
    single = rows[:1] * 2
    assert [c.text for c in tight.generate(single)] == [c.text for c in roomy.generate(single)]
    with TestClient(create_app(bundle_settings(tmp_path), engine=tight)) as client:
        body = client.post("/generate", json={"task": "task-0", "inputs": "ab", "max_new_tokens": 8}).json()
        assert body["outputs"][0]["text"] == roomy.generate(rows[:1])[0].text
        memory = client.get("/readyz").json()["memory"]
        assert {i["name"]: i["on"] for i in memory["items"]}["merge buffers"] is False
        values = metric_values(client.get("/metrics").text)
        assert metric(values, "mhr_memory_plan_bytes", item="merge buffers", on="false") > 0
        assert metric(values, "mhr_memory_budget_bytes") == tight.memory.budget_bytes
    for e in (roomy, tight):
        e.close()


def test_the_settings_reach_the_plan(t5_bundle, tmp_path):
    engine = build_engine(bundle_settings(t5_bundle, adapted_dir=tmp_path, memory_fraction=0.5,
                                          memory_limit_bytes=64 * 2**30, merge_single_task=False))
    assert engine.memory.fraction == 0.5 and engine.memory.figures.limit_bytes == 64 * 2**30
    assert not engine.merge_single_task
    assert engine.memory.kv_positions == 16384
    engine.close()
    engine = build_engine(bundle_settings(t5_bundle, adapted_dir=tmp_path, merge_single_task=True))
    assert engine.merge_single_task and "asked for" in next(i.why for i in engine.memory.items
                                                            if i.name == "merge buffers")
    engine.close()


def _mapped_rss_bytes(path_part: str) -> int | None:
    """Resident bytes of this process's mappings of files whose path contains path_part (None: no such mapping)."""
    total, found, inside = 0, False, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and path_part in fields[-1]
            found |= inside
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total if found else None


def test_memory_mapped_weights_are_made_resident_before_the_plan(tmp_path):
    """A loader that maps safetensors lazily would leave the weights out of the resident memory the plan reads."""
    model = T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=512, d_ff=2048, num_layers=4, num_heads=8,
                                                decoder_start_token_id=0, pad_token_id=0)).eval()
    model.save_pretrained(tmp_path / "model")
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    loaded = load_model(tmp_path / "model", device="cpu")
    before = _mapped_rss_bytes(str(tmp_path))
    if before is None or before > 0.5 * size:
        pytest.skip("the loader copied or read the weights already: nothing is left mapped lazily")
    plan_module.make_resident(loaded.model)
    assert _mapped_rss_bytes(str(tmp_path)) >= 0.95 * size
