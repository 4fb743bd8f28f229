"""The demo task family and the committed demo bundle (fast: the bundle is tiny)."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from demo.backbone import BackboneHparams, CurriculumSampler  # noqa: E402
from demo.batches import decode_ids  # noqa: E402
from demo.bundle import (  # noqa: E402
    DEFAULT_BUNDLE,
    bundle_megabytes,
    inventory_dir,
    load_inventory,
    load_task_rows,
    read_build_info,
)
from demo.metrics import mean, per_task_exact_match  # noqa: E402
from demo.tasks import (  # noqa: E402
    HELDOUT_TASKS,
    SKILLS,
    TRAIN_TASKS,
    apply,
    backbone_curriculum,
    examples,
    random_input,
    skill_code,
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


def _probe_inputs() -> list[str]:
    """Many random task inputs, plus the held-out evaluation inputs (eval seed 1000) themselves."""
    rng = random.Random(12345)
    inputs = [random_input(rng) for _ in range(2000)]
    return inputs + [text for task in HELDOUT_TASKS for text, _ in examples(task, 50, seed=1000)]


def _same_function(task: str, other: str, inputs: list[str]) -> bool:
    return all(apply(task, text) == apply(other, text) for text in inputs)


def test_equal_functions_are_detected():
    """The check below can see through names: commuting skills give one function under two names."""
    inputs = _probe_inputs()
    assert _same_function("upper-double", "double-upper", inputs)
    assert _same_function("double-devowel", "devowel-double", inputs)
    assert not _same_function("devowel-swapends", "swapends-devowel", inputs)  # equal on ~77% of inputs only


def test_backbone_curriculum_has_no_heldout_composition_in_any_form():
    """No held-out task reaches the backbone: not by name, not by prefix code, not as an equal function."""
    sampler = CurriculumSampler(BackboneHparams(), seed=0)
    curriculum = sampler.tasks()
    assert sorted(curriculum) == sorted(backbone_curriculum()) == sorted(list(SKILLS) + TRAIN_TASKS)
    assert not set(curriculum) & set(HELDOUT_TASKS)
    inputs = _probe_inputs()
    for heldout in HELDOUT_TASKS:
        for task in curriculum:
            assert not _same_function(heldout, task, inputs), (heldout, task)


def test_backbone_training_batches_hold_no_heldout_example():
    """Decode the sampler's real batches: every prefix names a curriculum task, and no target is a held-out one's."""
    sampler = CurriculumSampler(BackboneHparams(), seed=0)
    by_code = {skill_code(task): task for task in backbone_curriculum()}
    heldout_codes = {skill_code(task) for task in HELDOUT_TASKS}
    assert not heldout_codes & set(by_code)
    seen = set()
    for _ in range(60):  # 12 single-skill batches and 48 pair batches at the default share
        batch = sampler.next()
        for source, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
            code, text = decode_ids(source).split(":")
            target = decode_ids([i for i in labels if i >= 0])
            assert code in by_code and target == apply(by_code[code], text)
            seen.add(by_code[code])
    assert seen == set(backbone_curriculum())


def test_committed_bundle_was_built_on_the_strict_curriculum():
    info = read_build_info(DEFAULT_BUNDLE)
    assert info["backbone_curriculum"] == backbone_curriculum()
    assert not set(info["backbone_curriculum"]) & set(HELDOUT_TASKS)
    assert info["train_tasks"] == TRAIN_TASKS and info["heldout_tasks"] == HELDOUT_TASKS


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
