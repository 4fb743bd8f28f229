"""A corrupt or truncated file in the adapted folder is a broken task, not a failed start-up: the store opens, serves
everything else, lists the file with its reason, refuses the task naming the file, and a rewrite or a delete brings
it back or removes it. A file changed in place after it was checked turns its task broken when it is read."""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_store import (
    AdapterStore,
    BrokenCompositionError,
    BrokenTaskError,
    TaskConflictError,
    UnknownTaskError,
    persistence,
)
from tests.adapter_store.helpers import random_logits, same_adapter


@pytest.fixture
def store(inventory, tmp_path):
    shutil.copytree(inventory, tmp_path / "inv")
    store = AdapterStore.open(tmp_path / "inv")
    store.save_routing("good", "mhr-z", random_logits(store, 0))
    store.save_routing("bad", "mhr-z", random_logits(store, 1))
    store.save_composition("recipe", store.check_mix({"task-0": 1.0}))
    return store


def _rewrite(path, tensors=None, drop=(), **changes):
    """The file again with its tensors (or `tensors`) and its header metadata changed (`drop`: keys removed)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = {k: v for k, v in (handle.metadata() or {}).items() if k not in drop}
        found = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(found if tensors is None else tensors(found), str(path), metadata={**meta, **changes})


def _truncate(store):
    path = store.adapted_dir / "bad.safetensors"
    path.write_bytes(path.read_bytes()[:-50])


def _wrong_shape(store):
    _rewrite(store.adapted_dir / "bad.safetensors", lambda found: {k: torch.zeros(3) for k in found})


def _missing_key(store):
    _rewrite(store.adapted_dir / "bad.safetensors", lambda found: dict(list(found.items())[1:]))


def _no_version(store):
    _rewrite(store.adapted_dir / "bad.safetensors", drop=("version",))


def _version_not_a_number(store):
    _rewrite(store.adapted_dir / "bad.safetensors", version="one")


def _bad_recipe(store):
    path = store.adapted_dir / "recipe.safetensors"
    _rewrite(path, recipe="{not json")
    path.rename(store.adapted_dir / "bad.safetensors")


CORRUPTIONS = [
    ("truncated", _truncate, "cannot read safetensors header"),
    ("wrong shape", _wrong_shape, "expected shape"),
    ("missing tensor", _missing_key, "missing key"),
    ("header metadata missing", _no_version, "missing header metadata [key 'version']"),
    ("header metadata not a number", _version_not_a_number, "not a number: 'one' [key 'version']"),
    ("bad recipe JSON", _bad_recipe, "without a readable recipe"),
]


@pytest.mark.parametrize(("case", "corrupt", "reason"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupt_file_at_start_up_is_a_broken_task_and_the_rest_is_served(store, case, corrupt, reason):
    expected = store.adapter("good")
    corrupt(store)
    reopened = AdapterStore.open(store.inventory.folder)
    [broken] = reopened.broken_tasks()
    assert broken.name == "bad" and broken.file.endswith("bad.safetensors") and reason in broken.reason
    assert "bad" not in {info.name for info in reopened.tasks()}
    assert same_adapter(reopened.adapter("good"), expected)
    with pytest.raises(BrokenTaskError, match="bad.safetensors") as caught:
        reopened.adapter("bad")
    assert caught.value.name == "bad" and reason in caught.value.reason


def test_writing_a_broken_task_again_brings_it_back(store):
    _truncate(store)
    reopened = AdapterStore.open(store.inventory.folder)
    with pytest.raises(TaskConflictError, match="overwrite"):
        reopened.save_routing("bad", "mhr-z", random_logits(reopened, 2), overwrite=False)
    assert reopened.save_routing("bad", "mhr-z", random_logits(reopened, 2)).version == 1
    assert reopened.broken_tasks() == [] and reopened.task("bad").kind == "adapted"
    assert same_adapter(AdapterStore.open(store.inventory.folder).adapter("bad"), reopened.adapter("bad"))


def test_deleting_a_broken_task_removes_its_file(store):
    _wrong_shape(store)
    reopened = AdapterStore.open(store.inventory.folder)
    assert reopened.delete("bad").kind == "broken"
    assert not (store.adapted_dir / "bad.safetensors").exists() and reopened.broken_tasks() == []
    with pytest.raises(UnknownTaskError):
        reopened.task("bad")


def test_a_file_changed_in_place_after_its_check_turns_its_task_broken_when_read(store):
    (store.adapted_dir / "bad.safetensors").write_bytes(b"\x00" * 64)  # same process: no look again
    with pytest.raises(BrokenTaskError, match="cannot read safetensors data"):
        store.adapter("bad")
    assert [b.name for b in store.broken_tasks()] == ["bad"]
    with pytest.raises(BrokenTaskError):
        store.task("bad")


def test_a_shared_folder_reports_a_file_it_cannot_read_as_broken(store):
    reader = AdapterStore.open(store.inventory.folder, refresh_s=0)
    (store.adapted_dir / "late.safetensors").write_bytes(b"\x00" * 20)
    assert [b.name for b in reader.broken_tasks()] == ["late"]
    store.save_routing("late", "mhr-z", random_logits(store, 3))  # fixed by a writer: served again
    assert reader.task("late").version == 1 and reader.broken_tasks() == []


def test_the_files_header_is_all_that_is_read_at_start_up(store, monkeypatch):
    monkeypatch.setattr(persistence, "read_tensors", lambda path: pytest.fail(f"read {path}"))
    assert {"good", "bad", "recipe"} <= {info.name for info in AdapterStore.open(store.inventory.folder).tasks()}


def test_a_composition_file_is_checked_too(store):
    _rewrite(store.adapted_dir / "recipe.safetensors", recipe="[1, 2]")  # JSON, but not {task: weight}
    [broken] = AdapterStore.open(store.inventory.folder).broken_tasks()
    assert broken.name == "recipe" and "recipe" in broken.reason


def test_a_composition_whose_member_is_broken_is_refused_naming_the_members_file(store):
    store.save_composition("uses-bad", store.check_mix({"bad": 1.0, "task-0": 1.0}))
    store.save_composition("outer", store.check_mix({"uses-bad": 1.0}))
    _truncate(store)
    reopened = AdapterStore.open(store.inventory.folder)
    for task in ("uses-bad", "outer"):
        with pytest.raises(BrokenCompositionError, match="bad.safetensors") as caught:
            reopened.adapter(task)
        assert caught.value.name == task  # the task asked for: a batch fails only its rows
