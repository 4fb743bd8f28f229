"""Our routed and μ adapters equal PEFT's own Poly forward, for seq2seq and decoder-only models."""

import copy

import pytest
import torch
from peft.tuners.poly.router import PolyRouter

from adapter_store import AdapterStore
from adapter_store.inventory import ModuleGroup
from adapter_store.merge import merge_adapter
from adapter_store.routing import mix_group, mix_group_many, routing_weights
from tests.factories import LLAMA_TARGETS, T5_TARGETS, make_inventory, set_uniform_routing, tiny_llama, tiny_t5

N_TASKS = 3


def _inputs(kind: str):
    torch.manual_seed(1)
    ids = torch.randint(3, 259, (N_TASKS, 7))
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 259, (N_TASKS, 5))}
    return {"input_ids": ids}


def _merged_logits(base, adapter, inputs, row):
    model = copy.deepcopy(base)
    merge_adapter(model, adapter)
    with torch.no_grad():
        return model(**{k: v[row : row + 1] for k, v in inputs.items()}).logits[0]


CASES = [
    pytest.param("t5", tiny_t5, "SEQ_2_SEQ_LM", T5_TARGETS, 1, id="t5-poly-H1"),
    pytest.param("t5", tiny_t5, "SEQ_2_SEQ_LM", T5_TARGETS, 4, id="t5-mhr-H4"),
    pytest.param("llama", tiny_llama, "CAUSAL_LM", LLAMA_TARGETS, 1, id="llama-poly-H1"),
    pytest.param("llama", tiny_llama, "CAUSAL_LM", LLAMA_TARGETS, 2, id="llama-mhr-H2"),
]


@pytest.mark.parametrize("kind,factory,task_type,targets,heads", CASES)
def test_routed_adapters_equal_peft_for_every_task(tmp_path, kind, factory, task_type, targets, heads):
    base = factory()
    peft_model = make_inventory(base, tmp_path, task_type=task_type, targets=targets, n_splits=heads,
                                n_tasks=N_TASKS)
    store = AdapterStore.open(tmp_path)
    inputs = _inputs(kind)
    with torch.no_grad():
        expected = peft_model(**inputs, task_ids=torch.arange(N_TASKS)).logits
        bare = base(**inputs).logits
    for row in range(N_TASKS):
        ours = _merged_logits(base, store.adapter(f"task-{row}"), inputs, row)
        torch.testing.assert_close(ours, expected[row], atol=2e-5, rtol=1e-4)
        assert not torch.allclose(ours, bare[row], atol=1e-3), "the adapter must change the output"


@pytest.mark.parametrize("kind,factory,task_type,targets,heads", CASES[1::2])
def test_mu_adapter_equals_peft_with_uniform_routing(tmp_path, kind, factory, task_type, targets, heads):
    base = factory()
    peft_model = make_inventory(base, tmp_path, task_type=task_type, targets=targets, n_splits=heads)
    store = AdapterStore.open(tmp_path)
    set_uniform_routing(peft_model)
    inputs = _inputs(kind)
    with torch.no_grad():
        expected = peft_model(**inputs, task_ids=torch.zeros(N_TASKS, dtype=torch.long)).logits
    ours = _merged_logits(base, store.adapter("__mu__"), inputs, 0)
    torch.testing.assert_close(ours, expected[0], atol=2e-5, rtol=1e-4)


def test_routing_weights_match_peft_router_in_eval_mode():
    from peft import PolyConfig

    router = PolyRouter(PolyConfig(n_tasks=5, n_skills=3, n_splits=2)).eval()
    torch.nn.init.normal_(router.module_logits, std=3.0)
    task_ids = torch.arange(5)
    expected = router(task_ids=task_ids, input_ids=None)  # (5, H, K)
    torch.testing.assert_close(routing_weights(router.module_logits.detach(), 2, 3), expected)
    torch.testing.assert_close(expected.sum(-1), torch.ones(5, 2))


def test_batched_mixing_equals_per_layer_einsum():
    n_layers, heads, skills, d_in_h, rank, d_out_h = 3, 4, 5, 6, 2, 7
    group = ModuleGroup(
        names=("a", "b", "c"),
        lora_a=torch.randn(skills, n_layers, heads, d_in_h, rank),
        lora_b=torch.randn(skills, n_layers, heads, rank, d_out_h),
        logits=torch.randn(n_layers, 1, heads * skills),
    )
    weights = torch.softmax(torch.randn(n_layers, heads, skills), -1)
    mixed = mix_group(group, weights)
    for layer in range(n_layers):
        # PEFT's layer: einsum over skills, then reshape A rows / transpose-reshape B columns
        a = torch.einsum("qs,sqdr->qdr", weights[layer], group.lora_a[:, layer]).reshape(heads * d_in_h, rank)
        b = torch.einsum("qs,sqrd->qrd", weights[layer], group.lora_b[:, layer])
        b = b.transpose(0, 1).reshape(rank, heads * d_out_h)
        torch.testing.assert_close(mixed.lora_a[layer], a)
        torch.testing.assert_close(mixed.lora_b[layer], b)


def test_parameters_are_mixed_not_products():
    group = ModuleGroup(("m",), torch.randn(2, 1, 1, 4, 1), torch.randn(2, 1, 1, 1, 4), torch.zeros(1, 1, 2))
    weights = torch.tensor([[[0.5, 0.5]]])
    mixed = mix_group(group, weights)
    delta = mixed.lora_a[0] @ mixed.lora_b[0]
    mixture_of_products = sum(0.5 * group.lora_a[k, 0, 0] @ group.lora_b[k, 0, 0] for k in range(2))
    assert not torch.allclose(delta, mixture_of_products)


def test_mixing_many_tasks_at_once_equals_one_at_a_time():
    n_layers, heads, skills, d_in_h, rank, d_out_h = 2, 3, 4, 5, 2, 6
    group = ModuleGroup(("a", "b"), torch.randn(skills, n_layers, heads, d_in_h, rank),
                        torch.randn(skills, n_layers, heads, rank, d_out_h), torch.zeros(n_layers, 1, heads * skills))
    weights = torch.softmax(torch.randn(5, n_layers, heads, skills), -1)  # 5 tasks
    many_a, many_b = mix_group_many(group, weights)
    for task in range(5):
        one = mix_group(group, weights[task])
        torch.testing.assert_close(many_a[task], one.lora_a)
        torch.testing.assert_close(many_b[task], one.lora_b)
