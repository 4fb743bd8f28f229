"""Registry, persistence of adapted tasks, name rules, and export to a plain PEFT LoRA."""

import copy
import json
import shutil

import pytest
import torch
from peft import PeftModel

from adapter_store import (
    MU_TASK,
    AdapterStore,
    TaskConflictError,
    TaskNameError,
    UnknownTaskError,
    persistence,
    validate_task_name,
)
from tests.adapter_store.helpers import random_logits, same_adapter
from tests.factories import LLAMA_TARGETS, T5_TARGETS, make_inventory, tiny_llama, tiny_t5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inv")
    base = tiny_t5()
    peft_model = make_inventory(base, folder, task_type="SEQ_2_SEQ_LM", targets=T5_TARGETS, n_splits=2)
    return base, peft_model, folder


@pytest.fixture
def store(built, tmp_path):
    folder = tmp_path / "inv"
    shutil.copytree(built[2], folder)
    return AdapterStore.open(folder)


def _close(first, second):
    return all(torch.allclose(a1, a2, atol=1e-6) and torch.allclose(b1, b2, atol=1e-6)
               for (_, a1, b1), (_, a2, b2) in zip(first.layers(), second.layers(), strict=True))


def test_default_names_kinds_and_versions(store):
    tasks = {t.name: t for t in store.tasks()}
    assert set(tasks) == {MU_TASK, "__base__", "task-0", "task-1", "task-2"}
    assert tasks["task-1"].kind == "pretrained" and tasks["task-1"].row == 1 and tasks["task-1"].version == 1
    assert tasks[MU_TASK].kind == "mu"
    with pytest.raises(UnknownTaskError):
        store.task("nope")


def test_tasks_json_as_a_list_names_rows_in_order(built, tmp_path):
    folder = tmp_path / "inv"
    shutil.copytree(built[2], folder)
    (folder / "tasks.json").write_text(json.dumps(["x", "y", "z"]))
    assert AdapterStore.open(folder).task("z").row == 2


def test_saved_routing_task_survives_a_restart(store):
    logits = random_logits(store)
    info = store.save_routing("new-task", "mhr-z", logits)
    assert (info.kind, info.version, info.method) == ("adapted", 1, "mhr-z")
    expected = store.adapter_for_logits(logits)
    assert same_adapter(store.adapter("new-task"), expected)
    reopened = AdapterStore.open(store.inventory.folder)
    assert reopened.task("new-task").version == 1 and reopened.task("new-task").method == "mhr-z"
    assert same_adapter(reopened.adapter("new-task"), expected)
    assert not same_adapter(reopened.adapter("new-task"), reopened.adapter("task-0"))


def test_adapters_of_many_tasks_at_once_equal_one_at_a_time(store):
    store.save_routing("z-task", "mhr-z", random_logits(store, 3))
    store.save_lora("lora-task", "mhr-mu", store.adapter("task-1"))
    names = ["task-2", "z-task", "__mu__", "lora-task", "task-0", "z-task"]
    together = store.adapters(names)
    for name, adapter in zip(names, together, strict=True):
        assert _close(adapter, store.adapter(name))  # routed together: a batched matmul, same sums
    assert together[1] is together[5] and not _close(together[0], together[4])


def test_adapters_route_on_the_device_that_keeps_the_skills(store):
    """keep_skills_on(device): adapters(..., device) route on that device's copy (the meta device stands in for a
    GPU: shapes only, no values); other devices, and calls without one, route on the host as before."""
    store.save_routing("z-task", "mhr-z", random_logits(store, 3))
    names = ["task-2", "z-task", "__mu__", "task-0"]
    assert all(t.device.type == "cpu" for a in store.adapters(names, device="meta") for _, t, _ in a.layers())
    store.keep_skills_on("meta")
    assert next(iter(store._skills_on.values())).skills_nbytes == store.inventory.skills_nbytes
    on_meta = store.adapters(names, device="meta")
    for adapter, on_host in zip(on_meta, store.adapters(names), strict=True):
        for (name, a, b), (host_name, host_a, host_b) in zip(adapter.layers(), on_host.layers(), strict=True):
            assert a.device.type == b.device.type == "meta" and host_a.device.type == "cpu"
            assert (name, a.shape, b.shape) == (host_name, host_a.shape, host_b.shape)
    assert store.inventory.groups[0].lora_a.device.type == "cpu"  # the host's inventory is untouched


def test_task_deleted_and_adapted_again_gets_a_new_cache_key(store):
    store.save_routing("again", "mhr-z", random_logits(store, 0))
    first = store.cache_key("again")
    store.delete("again")
    store.save_routing("again", "mhr-z", random_logits(store, 1))
    assert store.task("again").version == 1 and store.cache_key("again") != first


def test_overwriting_an_adapted_task_bumps_its_version(store):
    store.save_routing("t", "mhr-z", random_logits(store, 0))
    key_v1 = store.cache_key("t")
    info = store.save_routing("t", "poly-z", random_logits(store, 1))
    assert info.version == 2 and store.cache_key("t") != key_v1
    assert AdapterStore.open(store.inventory.folder).task("t").version == 2


def test_pretrained_and_reserved_names_cannot_be_overwritten(store):
    with pytest.raises(TaskConflictError, match="pretrained"):
        store.save_routing("task-0", "mhr-z", random_logits(store))
    with pytest.raises(TaskNameError, match="reserved"):
        store.save_routing(MU_TASK, "mhr-z", random_logits(store))
    with pytest.raises(TaskConflictError):
        store.delete("task-0")


def test_lora_task_round_trip_and_delete(store):
    adapter = store.adapter("task-2")
    store.save_lora("mu-task", "mhr-mu", adapter)
    assert same_adapter(AdapterStore.open(store.inventory.folder).adapter("mu-task"), adapter)
    store.delete("mu-task")
    assert not (store.adapted_dir / "mu-task.safetensors").exists()
    with pytest.raises(UnknownTaskError):
        AdapterStore.open(store.inventory.folder).task("mu-task")


def test_partial_file_from_a_killed_write_is_removed_at_start_up(store):
    store.save_routing("kept", "mhr-z", random_logits(store))
    partial = store.adapted_dir / ".tmp-abc.safetensors"
    partial.write_bytes(b"half a file")
    reopened = AdapterStore.open(store.inventory.folder)
    assert not partial.exists() and reopened.task("kept").version == 1


def test_routing_learnt_for_another_inventory_is_skipped(store):
    store.save_routing("stale", "mhr-z", random_logits(store))
    config = store.inventory.folder / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 2', '"r": 2 '))  # same meaning, new fingerprint
    reopened = AdapterStore.open(store.inventory.folder)
    with pytest.raises(UnknownTaskError):
        reopened.task("stale")


@pytest.mark.parametrize("name", ["../x", "", "a" * 65, ".hidden", "a/b", "sp ace", "é", None, 3, "x\x00"])
def test_bad_task_names_are_refused(name):
    with pytest.raises(TaskNameError):
        validate_task_name(name)


@pytest.mark.parametrize("name", ["a", "A-b_c.d", "0" * 64, "task-0"])
def test_good_task_names_pass(name):
    assert validate_task_name(name) == name


def test_bad_name_writes_nothing(store):
    with pytest.raises(TaskNameError):
        store.save_routing("../escape", "mhr-z", random_logits(store))
    assert not store.adapted_dir.exists() or not any(store.adapted_dir.iterdir())


@pytest.mark.parametrize("model_kind", ["t5", "llama"])
def test_exported_lora_loaded_by_peft_gives_the_same_logits(tmp_path, model_kind):
    if model_kind == "t5":
        base, task_type, targets = tiny_t5(), "SEQ_2_SEQ_LM", T5_TARGETS
        inputs = {"input_ids": torch.randint(3, 259, (1, 6)), "decoder_input_ids": torch.randint(3, 259, (1, 4))}
    else:
        base, task_type, targets = tiny_llama(), "CAUSAL_LM", LLAMA_TARGETS
        inputs = {"input_ids": torch.randint(3, 259, (1, 6))}
    poly = make_inventory(base, tmp_path / "inv", task_type=task_type, targets=targets, n_splits=2)
    store = AdapterStore.open(tmp_path / "inv")
    out = store.export_lora("task-1", tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] / config["r"] == pytest.approx(0.5)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        expected = poly(**inputs, task_ids=torch.tensor([1])).logits
        torch.testing.assert_close(lora(**inputs).logits, expected, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-3)


def test_export_refuses_a_non_empty_folder(store, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        store.export_lora("task-0", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_logits_of_an_adapted_task_are_read_once_and_a_new_version_is_read_again(store, monkeypatch):
    reads = []
    original = persistence.read_tensors
    monkeypatch.setattr(persistence, "read_tensors", lambda path: reads.append(path) or original(path))
    store.save_routing("t", "mhr-z", random_logits(store, 0))
    first = store.adapter("t")
    assert same_adapter(store.adapter("t"), first) and len(reads) == 1
    store.save_routing("t", "mhr-z", random_logits(store, 1))
    assert not same_adapter(store.adapter("t"), first) and len(reads) == 2
