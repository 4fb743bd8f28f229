"""The states an adaptation job goes through: queued -> running -> succeeded | failed | cancelled."""

from __future__ import annotations

from typing import Literal, get_args

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
ACTIVE: tuple[JobState, ...] = ("queued", "running")
ENDED: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")
