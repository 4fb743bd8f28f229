"""Mixes in skill space: the routing math on mixed weights, done by hand from PEFT's files; validation; keys."""

import pytest
import torch
from safetensors.torch import load_file

from adapter_store import AdapterStore, BrokenCompositionError, Mix, MixError
from tests.factories import T5_TARGETS, make_inventory, tiny_t5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inventory")
    make_inventory(tiny_t5(), folder, task_type="SEQ_2_SEQ_LM", targets=T5_TARGETS, n_tasks=3, n_splits=2, n_skills=4,
                   task_names=["a", "b", "c"])
    return AdapterStore.open(folder, tmp_path_factory.mktemp("adapted"))


def by_hand(store, mix: dict[str, float], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A_t, B_t of one module for a mix, straight from adapter_model.safetensors (PEFT's keys and shapes)."""
    raw = load_file(store.inventory.folder / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    a, b, logits = raw[f"{key}.poly_lora_A"], raw[f"{key}.poly_lora_B"], raw[f"{key}.poly_router.module_logits"]
    heads, skills = a.shape[0], a.shape[1]
    rows = {"a": 0, "b": 1, "c": 2}
    total = sum(mix.values())
    w = torch.zeros(heads, skills)
    for task, c in mix.items():
        p = torch.sigmoid(logits[rows[task]].view(heads, skills))
        w += (c / total) * p / p.sum(-1, keepdim=True)
    a_t = torch.cat([torch.einsum("k,kir->ir", w[h], a[h]) for h in range(heads)], dim=0)  # (d_in, r)
    b_t = torch.cat([torch.einsum("k,kro->ro", w[h], b[h]) for h in range(heads)], dim=1)  # (r, d_out)
    return a_t, b_t


def test_a_mix_of_one_task_is_that_task(store):
    one, task = store.adapter(Mix.of({"b": 1.0})), store.adapter("b")
    for (_, a1, b1), (_, a2, b2) in zip(one.layers(), task.layers(), strict=True):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_a_two_task_mix_equals_the_routing_math_on_the_weights(store):
    mixed = {name: (a, b) for name, a, b in store.adapter(Mix.of({"a": 7, "c": 3})).layers()}
    for module in list(mixed)[:6]:
        a_t, b_t = by_hand(store, {"a": 0.7, "c": 0.3}, module)
        torch.testing.assert_close(mixed[module][0], a_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[module][1], b_t, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[module][0], by_hand(store, {"a": 1.0}, module)[0])


def test_mixes_batched_with_tasks_equal_each_alone(store):
    refs = ["a", Mix.of({"a": 1, "b": 1}), "__mu__", Mix.of({"__mu__": 1, "c": 3})]
    together = store.adapters(refs)
    for ref, adapter in zip(refs, together, strict=True):
        for (_, a1, b1), (_, a2, b2) in zip(adapter.layers(), store.adapter(ref).layers(), strict=True):
            torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("weights", "field", "message"), [
    ({}, "mix", "at least one"),
    ({"a": -1.0, "b": 1.0}, "mix.a", "≥ 0"),
    ({"a": 0.0, "b": 0.0}, "mix", "not all be zero"),
    ({"a": float("nan")}, "mix.a", "finite"),
    ({"nope": 1.0}, "mix.nope", "unknown task"),
    ({f"t{i}": 1.0 for i in range(17)}, "mix", "at most 16"),
])
def test_bad_mixes_name_the_field(store, weights, field, message):
    with pytest.raises(MixError, match=message) as error:
        store.check_mix(weights)
    assert error.value.field == field


def test_a_plain_lora_task_cannot_join_a_mix(store):
    store.save_lora("lora-task", "mhr-mu", store.adapter("a"))
    with pytest.raises(MixError, match="plain LoRA") as error:
        store.check_mix({"a": 1.0, "lora-task": 1.0})
    assert error.value.field == "mix.lora-task"
    store.delete("lora-task")


def test_mix_keys_follow_member_versions_and_names_are_canonical(store):
    mix = Mix.of({"c": 1, "a": 3})
    assert mix.name == "mix(a=0.75,c=0.25)" and mix == Mix.of({"a": 0.75, "c": 0.25, "b": 0})
    logits = [torch.randn(len(g.names), 8) for g in store.inventory.groups]
    store.save_routing("z", "mhr-z", logits)
    with_z = Mix.of({"a": 1, "z": 1})
    first = store.cache_key(with_z)
    assert store.cache_key(with_z) == first
    store.save_routing("z", "mhr-z", [z + 1 for z in logits])
    assert store.cache_key(with_z) != first  # a member's new version: a new key
    store.delete("z")
    with pytest.raises(BrokenCompositionError, match="'z', which no longer exists"):
        store.cache_key(with_z)


def test_compositions_persist_resolve_their_members_and_refuse_cycles(store):
    info = store.save_composition("ac", Mix.of({"a": 1, "c": 1}))
    assert info.kind == "composed" and info.recipe == (("a", 0.5), ("c", 0.5)) and info.version == 1
    reopened = AdapterStore.open(store.inventory.folder, store.adapted_dir)
    assert reopened.task("ac").recipe == info.recipe
    for (_, a1, _), (_, a2, _) in zip(reopened.adapter("ac").layers(), store.adapter(Mix.of({"a": 1, "c": 1})).layers(),
                                      strict=True):
        torch.testing.assert_close(a1, a2)
    nested = store.save_composition("nested", Mix.of({"ac": 1, "b": 1}))
    assert nested.recipe == (("ac", 0.5), ("b", 0.5))
    with pytest.raises(BrokenCompositionError, match="contains itself"):
        store.save_composition("ac", Mix.of({"nested": 1}), overwrite=True)
    assert store.task("ac").version == 1  # nothing written
    store.delete("nested")
    store.delete("ac")


def _same(first, second):
    return all(torch.allclose(a1, a2, rtol=1e-6, atol=0) and torch.allclose(b1, b2, rtol=1e-6, atol=0)
               for (_, a1, b1), (_, a2, b2) in zip(first.layers(), second.layers(), strict=True))


@pytest.mark.parametrize("scale", [1e308, 1e-308, 5e-324, 1e-320], ids=["huge", "tiny", "smallest subnormal",
                                                                         "subnormal"])
def test_only_proportions_count_at_any_scale(store, scale):
    even = Mix.of({"a": scale, "c": scale})
    assert even.members == (("a", 0.5), ("c", 0.5)) and even.name == "mix(a=0.5,c=0.5)"
    assert _same(store.adapter(even), store.adapter(Mix.of({"a": 1, "c": 1})))


def test_huge_weights_in_proportion_give_the_small_numbers_mix(store):
    huge = Mix.of({"a": 1.5e308, "b": 0.5e308})
    assert huge.as_dict() == pytest.approx({"a": 0.75, "b": 0.25})
    assert _same(store.adapter(huge), store.adapter(Mix.of({"a": 3, "b": 1})))


def test_a_weight_that_is_zero_next_to_the_largest_is_dropped_as_a_zero_is(store):
    assert Mix.of({"a": 1e308, "b": 1e-20}) == Mix.of({"a": 1.0}) == Mix.of({"a": 1.0, "b": 0})
    kept = Mix.of({"a": 1.0, "b": 5e-324})  # tiny, but representable next to 1: kept, in proportion
    assert [task for task, _ in kept.members] == ["a", "b"] and 0 < kept.as_dict()["b"] < 1e-300
