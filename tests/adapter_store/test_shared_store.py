"""One adapted folder shared by several stores (replicas of a cluster): each sees the others' new, overwritten and
deleted tasks within refresh_s, versions keep counting up across writers, and a store that is the folder's only
writer (refresh_s None) reads it once, as before."""

import errno
import os
import shutil
import time

import pytest

from adapter_store import AdapterStore, TaskConflictError, UnknownTaskError, persistence
from tests.adapter_store.helpers import random_logits, same_adapter


@pytest.fixture
def folder(inventory, tmp_path):
    shutil.copytree(inventory, tmp_path / "inv")
    return tmp_path / "inv"


def test_new_overwritten_and_deleted_tasks_are_seen_by_the_other_store(folder):
    writer, reader = (AdapterStore.open(folder, refresh_s=0) for _ in range(2))
    writer.save_routing("t", "mhr-z", random_logits(writer, 0))
    assert reader.task("t").version == 1 and reader.cache_key("t") == writer.cache_key("t")
    assert same_adapter(reader.adapter("t"), writer.adapter("t"))
    old_key, old_adapter = reader.cache_key("t"), reader.adapter("t")
    writer.save_routing("t", "mhr-z", random_logits(writer, 1))
    assert reader.task("t").version == 2 and reader.cache_key("t") != old_key
    assert same_adapter(reader.adapter("t"), writer.adapter("t")) and not same_adapter(reader.adapter("t"), old_adapter)
    writer.delete("t")
    with pytest.raises(UnknownTaskError):
        reader.task("t")
    assert "t" not in {info.name for info in reader.tasks()}


def test_plain_lora_and_composed_tasks_reach_the_other_store(folder):
    writer, reader = (AdapterStore.open(folder, refresh_s=0) for _ in range(2))
    writer.save_lora("mu-task", "mhr-mu", writer.adapter("task-1"))
    writer.save_composition("ab", reader.check_mix({"task-0": 0.5, "task-2": 0.5}))
    assert same_adapter(reader.adapter("mu-task"), writer.adapter("mu-task"))
    assert reader.task("ab").recipe == writer.task("ab").recipe
    assert same_adapter(reader.adapter("ab"), writer.adapter("ab"))


def test_versions_count_up_across_writers_and_conflicts_see_the_others_tasks(folder):
    first, second = (AdapterStore.open(folder, refresh_s=60) for _ in range(2))  # no look before a write needed
    first.save_routing("t", "mhr-z", random_logits(first, 0))
    with pytest.raises(TaskConflictError, match="already exists"):
        second.save_routing("t", "mhr-z", random_logits(second, 1), overwrite=False)
    assert second.save_routing("t", "mhr-z", random_logits(second, 1)).version == 2
    assert first.save_routing("t", "mhr-z", random_logits(first, 2)).version == 3


def test_a_change_is_seen_once_refresh_s_has_passed(folder):
    writer, reader = AdapterStore.open(folder, refresh_s=0), AdapterStore.open(folder, refresh_s=0.2)
    writer.save_routing("t", "mhr-z", random_logits(writer, 0))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            reader.task("t")
            break
        except UnknownTaskError:
            time.sleep(0.01)
    assert reader.task("t").version == 1


def test_on_change_names_each_task_another_store_changed(folder):
    writer, reader = (AdapterStore.open(folder, refresh_s=0) for _ in range(2))
    changed = []
    reader.on_change(changed.append)
    writer.save_routing("a", "mhr-z", random_logits(writer, 0))
    reader.tasks()
    writer.delete("a")
    reader.tasks()
    assert changed == ["a", "a"]
    reader.save_routing("b", "mhr-z", random_logits(reader, 0))  # its own write is no news
    reader.tasks()
    assert changed == ["a", "a"]


def test_without_refresh_the_folder_is_read_once(folder):
    writer, reader = AdapterStore.open(folder), AdapterStore.open(folder)
    writer.save_routing("t", "mhr-z", random_logits(writer, 0))
    with pytest.raises(UnknownTaskError):
        reader.task("t")
    assert not (folder / "adapted" / persistence.LOCK_FILE).exists()


def test_unreadable_file_appearing_later_is_ignored_not_fatal(folder):
    reader = AdapterStore.open(folder, refresh_s=0)
    (folder / "adapted").mkdir(exist_ok=True)
    (folder / "adapted" / "broken.safetensors").write_bytes(b"\x00" * 20)
    (folder / "adapted" / "task-0.safetensors").write_bytes(b"\x00" * 20)  # a pretrained task's name
    assert {"task-0", "broken"} & {info.name for info in reader.tasks()} == {"task-0"}
    assert reader.task("task-0").kind == "pretrained"


def test_shared_store_leaves_a_live_writers_temp_file_alone(folder):
    adapted = folder / "adapted"
    adapted.mkdir(exist_ok=True)
    fresh, old = adapted / ".tmp-live.safetensors", adapted / ".tmp-dead.safetensors"
    fresh.write_bytes(b"being written")
    old.write_bytes(b"left by a killed writer")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    AdapterStore.open(folder, refresh_s=0.25)
    assert fresh.exists() and not old.exists()


def test_a_task_written_inside_the_readers_refresh_window_is_found_not_unknown(folder):
    """The cluster's 404 for a task that existed: a replica answered a lookup from its last look at the folder,
    taken just before another replica wrote the task. A miss looks at the name's file first."""
    writer, reader = AdapterStore.open(folder, refresh_s=60), AdapterStore.open(folder, refresh_s=60)
    assert "t" not in {info.name for info in reader.tasks()}  # the reader's look: fresh for the next 60 s
    changed = []
    reader.on_change(changed.append)
    writer.save_routing("t", "mhr-z", random_logits(writer, 0))
    assert reader.task("t").version == 1 and changed == ["t"]
    assert same_adapter(reader.adapter("t"), writer.adapter("t"))


def test_a_task_deleted_inside_the_readers_refresh_window_is_unknown_when_read(folder):
    writer, reader = AdapterStore.open(folder, refresh_s=60), AdapterStore.open(folder, refresh_s=60)
    writer.save_routing("t", "mhr-z", random_logits(writer, 0))
    assert reader.task("t").version == 1
    writer.delete("t")
    with pytest.raises(UnknownTaskError):  # not an unreadable-file error: its file is gone
        reader.adapter("t")
    with pytest.raises(UnknownTaskError):
        reader.task("t")


def test_a_miss_for_a_name_that_cannot_be_a_file_touches_no_path(folder):
    reader = AdapterStore.open(folder, refresh_s=60)
    with pytest.raises(UnknownTaskError):
        reader.task("../inv/adapter_model")


def test_an_io_error_reading_a_header_keeps_the_known_version_and_is_read_again(folder, monkeypatch):
    writer, reader = AdapterStore.open(folder, refresh_s=0), AdapterStore.open(folder, refresh_s=0)
    writer.save_routing("t", "mhr-z", random_logits(writer, 0))
    assert reader.task("t").version == 1
    writer.save_routing("t", "mhr-z", random_logits(writer, 1))
    read = persistence.read_adapted_file

    def failing(*_):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(persistence, "read_adapted_file", failing)
    assert reader.task("t").version == 1 and reader.broken_tasks() == []  # not forgotten, not broken
    monkeypatch.setattr(persistence, "read_adapted_file", read)
    assert reader.task("t").version == 2


def test_a_name_another_store_just_took_is_a_conflict_at_once(folder):
    writer, reader = AdapterStore.open(folder, refresh_s=60), AdapterStore.open(folder, refresh_s=60)
    reader.tasks()
    writer.save_routing("t", "mhr-z", random_logits(writer, 0))
    with pytest.raises(TaskConflictError, match="already exists"):
        reader.check_writable("t")
