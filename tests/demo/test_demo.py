"""The demo task family and the committed demo bundle (fast: the bundle is tiny)."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from demo.bundle import DEFAULT_BUNDLE, bundle_megabytes, inventory_dir, load_inventory, load_task_rows  # noqa: E402
from demo.metrics import mean, per_task_exact_match  # noqa: E402
from demo.tasks import (  # noqa: E402
    HELDOUT_TASKS,
    SKILLS,
    TRAIN_TASKS,
    apply,
    examples,
    random_input,
    skills_of,
    with_prefix,
)


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("reverse-upper", "abcd", "DCBA"),
        ("upper-shift", "xyz", "YZA"),
        ("shift-double", "az", "bbaa"),
        ("devowel-capfirst", "house", "Hs"),
        ("rotate-swapends", "abcd", "acdb"),
        ("swapends-devowel", "abcde", "bcd"),
        ("double-rotate", "ab", "abba"),
        ("capfirst-reverse", "abc", "cbA"),
        ("reverse-rotate", "abcd", "cbad"),
    ],
)
def test_compositions_apply_skills_left_to_right(task, text, expected):
    assert apply(task, text) == expected


def test_examples_are_deterministic_from_the_seed():
    first = examples("reverse-upper", 20, seed=3)
    assert first == examples("reverse-upper", 20, seed=3)
    assert first != examples("reverse-upper", 20, seed=4)
    assert all(target == apply("reverse-upper", text) for text, target in first)
    assert all(3 <= len(text) <= 6 and text.islower() for text, _ in first)


def test_heldout_tasks_are_new_compositions_of_seen_skills():
    seen = {skill for task in TRAIN_TASKS for skill in skills_of(task)}
    assert seen == set(SKILLS)
    assert not set(HELDOUT_TASKS) & set(TRAIN_TASKS)
    for task in HELDOUT_TASKS:
        assert set(skills_of(task)) <= seen


def test_every_task_is_a_distinct_function():
    rng = random.Random(0)
    inputs = [random_input(rng) for _ in range(300)]
    signature = lambda task: tuple(apply(task, text) for text in inputs)
    singles = {signature(skill) for skill in SKILLS} | {tuple(inputs)}
    tasks = TRAIN_TASKS + HELDOUT_TASKS
    signatures = [signature(task) for task in tasks]
    assert len(set(signatures)) == len(tasks)
    assert not set(signatures) & singles


def test_prefix_names_the_skills():
    assert with_prefix("reverse-upper", "abcd") == "01:abcd"


def test_bundle_files_and_task_rows():
    assert bundle_megabytes(DEFAULT_BUNDLE) <= 20.0
    config = json.loads((inventory_dir(DEFAULT_BUNDLE) / "adapter_config.json").read_text())
    assert config["peft_type"] == "POLY" and config["n_splits"] > 1
    rows = load_task_rows(DEFAULT_BUNDLE)
    assert sorted(rows.values()) == list(range(config["n_tasks"]))
    assert list(rows) == TRAIN_TASKS


@pytest.fixture(scope="module")
def inventory():
    return load_inventory(DEFAULT_BUNDLE)


def test_routed_adapter_beats_no_adapter(inventory):
    rows = load_task_rows(DEFAULT_BUNDLE)
    tasks = ["reverse-upper", "shift-double"]
    routed = per_task_exact_match(inventory, tasks, n=8, seed=77, task_ids=[rows[t] for t in tasks])
    with inventory.disable_adapter():
        bare = per_task_exact_match(inventory, tasks, n=8, seed=77)
    assert mean(routed) >= 0.5
    assert mean(routed) > mean(bare)
