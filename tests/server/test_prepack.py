"""Prepacked (oneDNN) base weights: the same layer outputs and engine outputs as the plain weights, plain
weights whenever gradients are on, and a clear start-up error where packing is asked for but impossible."""

import pytest
import torch
from torch import nn

from adapter_store import AdapterCache, AdapterStore
from server.app import build_engine
from server.engine import Engine, GenerateRow, ModelLoadError, SamplingParams, ScoreRow, load_model
from server.engine import engine as engine_module
from server.engine import prepack as prepack_module
from server.engine.adapter_slots import AdapterSlots
from server.engine.lora_layer import BatchedLoraLinear
from server.engine.memory_plan import MemoryFigures
from server.engine.prepack import pack_weight, packed_linear, prepack_supported
from server.settings import Settings
from tests.factories import save_bundle

pytestmark = pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.float32),
                                reason="this CPU build has no oneDNN")
TOL = dict(rtol=1e-5, atol=1e-5)


def _layer(d_in=24, d_out=40, seed=0) -> BatchedLoraLinear:
    torch.manual_seed(seed)
    return BatchedLoraLinear(nn.Linear(d_in, d_out))


def _adapter(d_in=24, d_out=40, r=4, rows=None):
    shape_a, shape_b = ((rows, d_in, r), (rows, r, d_out)) if rows else ((d_in, r), (r, d_out))
    return torch.randn(shape_a), torch.randn(shape_b)


def test_packed_linear_equals_f_linear_for_2d_and_3d_inputs():
    linear = nn.Linear(24, 40)
    packed = pack_weight(linear.weight, 16)
    for x in (torch.randn(5, 24), torch.randn(3, 7, 24)):
        assert torch.allclose(packed_linear(x, packed, linear.bias), linear(x), **TOL)


@pytest.mark.parametrize("mode", ["off", "rows", "shared", "merged"])
def test_prepacked_layer_equals_plain_layer_in_every_mode(mode):
    plain, packed = _layer(), _layer()
    assert packed.prepack(16) and packed.packed is not None
    a, b = _adapter(rows=3) if mode == "rows" else _adapter()
    if mode == "rows":
        a = a.transpose(1, 2).contiguous()  # rows mode takes Aᵀ (N, r, d_in)
    for layer in (plain, packed):
        if mode != "off":
            getattr(layer, f"set_{mode}")(a, b, 0.25)
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        assert torch.allclose(packed(x), plain(x), **TOL)
    if mode == "merged":
        assert packed.active.merged_packed and not plain.active.merged_packed


def test_merged_packed_weight_is_kept_for_the_same_key_and_redone_for_another():
    layer = _layer()
    layer.prepack(16)
    a, b = _adapter()
    layer.set_merged(a, b, 0.25, key="task-a")
    first = layer.active.merged
    layer.set_merged(a, b, 0.25, key="task-a")
    assert layer.active.merged is first
    layer.set_merged(a * 2, b, 0.25, key="task-b")
    assert layer.active.merged is not first
    x = torch.randn(2, 24)
    expected = nn.functional.linear(x, layer.base.weight + 0.25 * (a * 2 @ b).T, layer.base.bias)
    with torch.inference_mode():
        assert torch.allclose(layer(x), expected, **TOL)


def test_with_gradients_on_the_plain_weight_runs_and_gradients_match():
    """oneDNN's linear has no autograd kernel: a training step must not touch the packed copy."""
    grads = []
    for prepack in (False, True):
        layer = _layer()
        if prepack:
            layer.prepack(16)
        a, b = _adapter()
        a.requires_grad_(True)
        layer.set_shared(a, b, 0.25)
        x = torch.randn(3, 24, requires_grad=True)
        layer(x).square().sum().backward()
        grads.append((a.grad, x.grad))
    assert torch.allclose(grads[0][0], grads[1][0], **TOL) and torch.allclose(grads[0][1], grads[1][1], **TOL)
    assert grads[1][1].abs().sum() > 0


def test_unpack_drops_the_packed_copies():
    layer = _layer()
    layer.prepack(16)
    layer.set_merged(*_adapter(), 0.25, key="k")
    layer.unpack()
    assert layer.packed is None and layer._merge_buffer is None
    layer.set_merged(*_adapter(), 0.25, key="k")
    assert not layer.active.merged_packed


@pytest.fixture(scope="module")
def t5_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5")
    save_bundle(folder, "t5")
    return folder


def _engine(folder, **kwargs) -> Engine:
    return Engine(load_model(folder / "model", device="cpu"), AdapterStore.open(folder / "inventory"),
                  AdapterCache(10**8), **kwargs)


def test_engine_outputs_and_scores_equal_with_and_without_prepacking(t5_bundle):
    packed, plain = _engine(t5_bundle, prepack_weights=True), _engine(t5_bundle, prepack_weights=False)
    assert packed.prepacked and not plain.prepacked
    assert all(layer.packed is not None for layer in packed.slots.layers.values())
    greedy = SamplingParams(max_new_tokens=8)
    rows = [GenerateRow(f"task-{i % 3}", text, greedy) for i, text in enumerate(["hi", "abc", "a longer input"])]
    single = [GenerateRow("task-1", "abc", greedy)]
    beams = [GenerateRow("task-2", "xyz", SamplingParams(max_new_tokens=8, num_beams=3))]
    for batch in (rows, single, beams):
        assert [c.text for c in packed.generate(batch)] == [c.text for c in plain.generate(batch)]
    score = [ScoreRow("task-0", "abc", ["yes", "no"]), ScoreRow("task-2", "hi", ["maybe", "no"])]
    for ours, reference in zip(packed.score(score), plain.score(score), strict=True):
        assert [c.logprob_sum for c in ours] == pytest.approx([c.logprob_sum for c in reference], abs=1e-4)


def test_auto_packs_only_weights_large_enough_to_gain(t5_bundle):
    engine = _engine(t5_bundle)  # the tiny test model's weights are all below the threshold
    assert not engine.prepacked
    assert all(layer.packed is None for layer in engine.slots.layers.values())
    model = nn.ModuleDict({"big": nn.Linear(512, 512), "small": nn.Linear(64, 512)})
    slots = AdapterSlots(model, ["big", "small"])
    assert slots.prepack(16) == 1
    assert slots.layers["big"].packed is not None and slots.layers["small"].packed is None
    assert slots.prepack(16, every_layer=True) == 2


def test_prepacking_asked_for_where_unsupported_stops_start_up(t5_bundle, monkeypatch):
    monkeypatch.setattr(engine_module, "prepack_supported", lambda device, dtype: False)
    assert not _engine(t5_bundle).prepacked  # auto: simply off
    with pytest.raises(ModelLoadError, match="prepack_weights"):
        _engine(t5_bundle, prepack_weights=True)


def test_auto_does_not_pack_when_the_memory_plan_has_no_room(t5_bundle, monkeypatch):
    monkeypatch.setattr(prepack_module, "MIN_PACKED_ELEMENTS", 0)  # every layer of the tiny model worth packing
    assert _engine(t5_bundle).prepacked
    tight = MemoryFigures(limit_bytes=10 * 2**20, held_bytes=0, source="test")  # room for the pool, KV and cache
    engine = _engine(t5_bundle, memory=tight)
    assert not engine.prepacked and engine.slots.bytes_to_pack() > 0
    assert all(layer.packed is None for layer in engine.slots.layers.values())


def test_the_setting_reaches_the_engine(t5_bundle):
    def engine_with(**settings):
        return build_engine(Settings(model=t5_bundle / "model", inventory=t5_bundle / "inventory", device="cpu",
                                     adapted_dir=t5_bundle / "adapted", **settings))

    assert engine_with(prepack_weights=True).prepacked
    assert not engine_with(prepack_weights=False).prepacked
