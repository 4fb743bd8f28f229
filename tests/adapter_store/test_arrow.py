"""Arrow libraries: prototypes against a dense SVD, skills as one-hot tasks, tasks as their routed LoRAs, keys."""

import pytest
import torch

from adapter_store import AdapterStore
from adapter_store.arrow import (
    ArrowError,
    ArrowLibraries,
    ArrowSpec,
    library_key,
    library_of_skills,
    library_of_tasks,
    skill_loras,
    top_input_directions,
)
from adapter_store.routing import mix_group
from tests.adapter_store.helpers import random_logits
from tests.factories import T5_TARGETS, make_inventory, tiny_t5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inventory")
    make_inventory(tiny_t5(), folder, task_type="SEQ_2_SEQ_LM", targets=T5_TARGETS, n_tasks=3, n_splits=2, n_skills=4,
                   task_names=["a", "b", "c"])
    return AdapterStore.open(folder, tmp_path_factory.mktemp("adapted"))


def dense_top_input_direction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top left singular vector of the dense ΔW = A B (d_in, d_out): y = x ΔW, x on the left."""
    u, _, _ = torch.linalg.svd(a.double() @ b.double())
    return u[:, 0]


@pytest.mark.parametrize(("d_in", "d_out", "rank"), [(16, 24, 2), (32, 8, 4), (12, 12, 1)])
def test_prototype_is_the_top_singular_vector_of_the_dense_delta(d_in, d_out, rank):
    gen = torch.Generator().manual_seed(d_in + rank)
    a = torch.randn(3, 5, d_in, rank, generator=gen)
    b = torch.randn(3, 5, rank, d_out, generator=gen)
    p = top_input_directions(a, b)  # (3, 5, d_in)
    assert p.shape == (3, 5, d_in)
    for i in range(3):
        for j in range(5):
            ref = dense_top_input_direction(a[i, j], b[i, j])
            assert abs(float(p[i, j].double() @ ref)) == pytest.approx(1.0, abs=1e-5)  # equal up to sign
            assert float(p[i, j].norm()) == pytest.approx(1.0, abs=1e-5)


def test_prototype_is_not_the_output_side_direction():
    """The input side (rows of A B, d_in) — not the output side: a wrong transpose would not even have d_in."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 2, generator=gen), torch.randn(2, 6, generator=gen)
    p = top_input_directions(a, b)
    x = torch.randn(200, 10, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    gain = (p @ a @ b).norm()  # ‖p ΔW‖ is the top singular value: no unit input does better
    assert gain >= ((x @ a @ b).norm(dim=1)).max() - 1e-5


def test_skill_k_is_the_task_with_one_hot_weights_on_k(store):
    group = store.inventory.groups[0]
    a, b = skill_loras(group)  # (L, K, d_in, r), (L, K, r, d_out)
    n_layers, skills = len(group.names), group.lora_a.shape[0]
    heads = store.inventory.config.n_splits
    for k in range(skills):
        w = torch.zeros(n_layers, heads, skills)
        w[..., k] = 1.0
        mixed = mix_group(group, w)
        assert torch.equal(a[:, k], mixed.lora_a) and torch.equal(b[:, k], mixed.lora_b)


def test_library_of_skills_prototypes_match_dense_svd(store):
    library = library_of_skills(store)
    assert library.experts == ("skill-0", "skill-1", "skill-2", "skill-3")
    name, p, a, b = next(library.layers())
    for j in range(len(library.experts)):
        assert abs(float(p[j].double() @ dense_top_input_direction(a[j], b[j]))) == pytest.approx(1.0, abs=1e-5)


def test_library_of_tasks_holds_each_tasks_routed_lora(store):
    library = library_of_tasks(store)
    assert library.experts == ("a", "b", "c")
    for j, task in enumerate(library.experts):
        adapter = store.adapter(task)
        for (name, _, a, b), (name2, a_t, b_t) in zip(library.layers(), adapter.layers(), strict=True):
            assert name == name2
            assert torch.allclose(a[j], a_t, atol=1e-6) and torch.allclose(b[j], b_t, atol=1e-6)


def test_a_readapted_task_changes_the_library(tmp_path):
    folder = tmp_path / "inventory"
    make_inventory(tiny_t5(), folder, task_type="SEQ_2_SEQ_LM", targets=T5_TARGETS, n_tasks=2, n_splits=2,
                   n_skills=4, task_names=["a", "b"])
    store = AdapterStore.open(folder, tmp_path / "adapted")
    libraries = ArrowLibraries()
    store.save_routing("new", "mhr-z", random_logits(store, seed=1))
    first = libraries.get(store, "tasks")
    assert first.experts == ("a", "b", "new")
    assert libraries.get(store, "tasks") is first  # cached
    store.save_routing("new", "mhr-z", random_logits(store, seed=2), overwrite=True)
    assert library_key(store, "tasks") != first.key
    second = libraries.get(store, "tasks")
    assert second is not first and libraries.builds == 2
    _, p1, _, _ = next(first.layers())
    _, p2, _, _ = next(second.layers())
    assert torch.equal(p1[:2], p2[:2]) and not torch.allclose(p1[2], p2[2])
    assert libraries.get(store, "skills").key == library_key(store, "skills")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"over": "experts"}, "over"), ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"temperature": 0}, "temperature"), ({"temperature": float("inf")}, "temperature"),
])
def test_bad_specs_name_their_field(kwargs, field):
    with pytest.raises(ArrowError) as info:
        ArrowSpec(**kwargs)
    assert info.value.field == field


def test_top_k_over_the_library_is_refused(store):
    libraries = ArrowLibraries()
    libraries.check(store, ArrowSpec("skills", 4))
    with pytest.raises(ArrowError) as info:
        libraries.check(store, ArrowSpec("tasks", 4))
    assert info.value.field == "top_k" and "3 tasks" in str(info.value)
    assert ArrowSpec("tasks", None).name == "arrow(over=tasks,top_k=all,temperature=1)"
