"""Adaptation job records on disk: `<adapted>/.jobs/<id>.json`, each written atomically (temp file, os.replace).

Several servers may share the folder (the replicas of a cluster share the store). Then each record names its
`owner`, the process that runs the job, and carries a `heartbeat` the owner renews every HEARTBEAT_S while the job
is queued or running. A reader reports a job whose owner stopped renewing it (killed, machine gone) as failed —
nothing partial was written, as task files are atomic — without writing to the record, so a reader never races the
owner. A reader asks the owner to cancel one of its jobs with a marker file, `<id>.cancel`, that the owner looks for
at each heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from .states import ACTIVE

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
STALE_S = 5.0  # a queued or running job whose heartbeat is older than this is reported failed
OWNER_GONE = "interrupted: the server running this job stopped; nothing was saved"
TEMP_PREFIX = ".tmp-"
CANCEL_SUFFIX = ".cancel"
Record = dict  # an AdaptJob as JSON: its fields (and owner, heartbeat)


class JobRecords:
    def __init__(self, folder: Path):
        self.folder = folder
        self._parsed: dict[str, tuple[tuple[int, int, int], Record]] = {}  # file name -> (signature, record)

    def save(self, record: Record) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".json", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            os.replace(tmp, self.folder / f"{record['id']}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_all(self) -> dict[str, Record]:
        """Every readable record, by job id (a file unchanged since the last call is not parsed again)."""
        found, parsed = {}, {}
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return found
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                stat = entry.stat()
                signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                cached = self._parsed.get(entry.name)
                record = cached[1] if cached and cached[0] == signature else json.loads(Path(entry.path).read_text())
            except FileNotFoundError:
                continue
            except ValueError as exc:
                log.warning("ignoring unreadable job record %s (%s)", entry.path, exc)
                continue
            if not isinstance(record, dict):
                log.warning("ignoring job record %s: not a JSON object", entry.path)
                continue
            parsed[entry.name] = (signature, record)
            found[record.get("id", entry.name[: -len(".json")])] = record
        self._parsed = parsed
        return found

    def remove_partial_files(self, older_than_s: float = 0.0) -> None:
        cutoff = time.time() - older_than_s
        for stale in self.folder.glob(TEMP_PREFIX + "*") if self.folder.is_dir() else []:
            try:
                if older_than_s <= 0 or stale.stat().st_mtime < cutoff:
                    stale.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    # ---- cancellation asked by another server ------------------------------------------------------
    def ask_to_cancel(self, job_id: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / (job_id + CANCEL_SUFFIX)).touch()

    def take_cancel_request(self, job_id: str) -> bool:
        """Whether another server asked to cancel the job (the request is consumed)."""
        marker = self.folder / (job_id + CANCEL_SUFFIX)
        try:
            marker.unlink()
        except FileNotFoundError:
            return False
        return True


def as_seen(record: Record, now: float | None = None) -> Record:
    """The record as readers report it: a queued or running job whose owner stopped renewing its heartbeat is
    failed."""
    now = time.time() if now is None else now
    if record.get("state") not in ACTIVE or now - (record.get("heartbeat") or 0.0) <= STALE_S:
        return record
    return {**record, "state": "failed", "error": OWNER_GONE, "finished": record.get("heartbeat") or now}
