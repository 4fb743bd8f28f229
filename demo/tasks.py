"""A family of composable string tasks that share skills.

A *skill* is a primitive transformation of a short lowercase string. A *task* is a composition of
skills, named by joining skill names with ``-`` and applied left to right: ``"reverse-upper"`` first
reverses, then upper-cases. The model input never names the task (only the adapter or, for the
backbone, an instruction prefix does).

Held-out tasks are new compositions of skills that all appear in training tasks, and none of them
computes the same function as a training task or a single skill (checked in tests/demo). No training
data, for the backbone or the inventory, contains a held-out composition (see backbone_curriculum).
"""

from __future__ import annotations

import random
from collections.abc import Callable

VOWELS = frozenset("aeiouAEIOU")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN = 3, 6
SEP = "-"  # task names must be safe file names ([A-Za-z0-9._-]): "reverse-upper"


def _shift_char(c: str) -> str:
    """Caesar +1 on letters, case kept (z -> a, Z -> A); other characters unchanged."""
    if "a" <= c <= "z":
        return chr((ord(c) - ord("a") + 1) % 26 + ord("a"))
    if "A" <= c <= "Z":
        return chr((ord(c) - ord("A") + 1) % 26 + ord("A"))
    return c


def _swap_ends(s: str) -> str:
    return s if len(s) < 2 else s[-1] + s[1:-1] + s[0]


SKILLS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "shift": lambda s: "".join(_shift_char(c) for c in s),
    "double": lambda s: "".join(c + c for c in s),
    "devowel": lambda s: "".join(c for c in s if c not in VOWELS),
    "rotate": lambda s: s[1:] + s[:1],
    "swapends": _swap_ends,
    "capfirst": lambda s: s[:1].swapcase() + s[1:],
}

TRAIN_TASKS: list[str] = [
    "reverse-upper",
    "reverse-shift",
    "reverse-double",
    "reverse-devowel",
    "rotate-reverse",
    "shift-rotate",
    "shift-double",
    "shift-capfirst",
    "upper-shift",
    "upper-rotate",
    "upper-swapends",
    "double-rotate",
    "double-swapends",
    "double-capfirst",
    "devowel-shift",
    "devowel-rotate",
    "devowel-capfirst",
    "rotate-swapends",
    "rotate-capfirst",
    "swapends-reverse",
    "swapends-devowel",
    "swapends-shift",
    "capfirst-reverse",
    "capfirst-double",
]

HELDOUT_TASKS: list[str] = [
    "reverse-rotate",
    "reverse-capfirst",
    "shift-devowel",
    "upper-double",
    "double-devowel",
    "devowel-swapends",
    "swapends-rotate",
    "capfirst-swapends",
]


def skills_of(task: str) -> list[str]:
    """The skill names of a task, in application order; raises KeyError on an unknown skill."""
    names = task.split(SEP)
    for name in names:
        if name not in SKILLS:
            raise KeyError(f"unknown skill {name!r} in task {task!r}")
    return names


def apply(task: str, text: str) -> str:
    """Apply the task's skills to ``text``, left to right."""
    for name in skills_of(task):
        text = SKILLS[name](text)
    return text


def random_input(rng: random.Random) -> str:
    """A lowercase string of MIN_LEN..MAX_LEN letters with at least two consonants."""
    while True:
        text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if sum(c not in VOWELS for c in text) >= 2:
            return text


def examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (input, target) pairs of ``task``, deterministic from (task, seed)."""
    rng = random.Random(f"{task}|{seed}")
    inputs = [random_input(rng) for _ in range(n)]
    return [(text, apply(task, text)) for text in inputs]


def backbone_curriculum() -> list[str]:
    """The backbone's instruction-prefixed tasks: every single skill and the training compositions.

    No held-out composition is in it, in any form: no held-out pair, and no other task that computes
    the same function (``double-upper`` equals ``upper-double``, so the other pairs are left out too;
    tests/demo checks functional equality on random inputs).
    """
    return list(SKILLS) + list(TRAIN_TASKS)


def skill_code(task: str) -> str:
    """Compact instruction naming a task's skills by their index in SKILLS: ``"reverse-upper"`` -> ``"01"``.

    Digits keep the backbone's inputs short (speed on CPU) and never collide with the lowercase inputs.
    """
    order = list(SKILLS)
    return "".join(str(order.index(name)) for name in skills_of(task))


def with_prefix(task: str, text: str) -> str:
    """The backbone's instruction-prefixed input, e.g. ``"reverse-upper", "abcd"`` -> ``"01:abcd"``."""
    return f"{skill_code(task)}:{text}"
