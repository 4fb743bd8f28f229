"""The soak's fault phase: faults a user meets, on a second server process while the soak runs.

That server shares nothing with the soaked one but the model files. Its adapted folder is a real small filesystem
(a 1 MiB tmpfs, mounted when we may: root with CAP_SYS_ADMIN) that is filled up before one adaptation job writes to it
— the job must end failed, naming the folder. Where mounting is not permitted, the server process may write no file
over 4 KiB instead (RLIMIT_FSIZE: a composed task's file fits, an adapted task's does not; the write fails with EFBIG,
root included). A composed task's file there is then truncated on disk: the server runs with shared_store, so it
looks at the folder again and that task answers 409 (broken_task) while every other task keeps answering 200.

    with disk_that_fills(parent) as disk:          # disk.folder, disk.how, disk.max_file_bytes (for start_server)
        faults = FaultPhase(base, disk, tasks)     # the server started on disk.folder
        await faults.run(deadline)                 # during the soak
        faults.result()                            # {"faults_5xx": 0, "faults_other_tasks_failed": 0, ...}
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

COMPOSED = "faults-composed"
# shared_store: it looks at its folder again, so a file changed on disk is seen. One torch thread and paced clients:
# a second busy torch process on the soak's cores would measure oversubscription, not the soak.
SERVER_ENV = {"MHR_SHARED_STORE": "1", "MHR_THREADS": "1"}
CLIENTS = 2
PACE_S = 0.2  # each fault client sends a request at most this often
FILE_LIMIT_BYTES = 4096  # without a mount: larger than a composed task's file or a job record, smaller than a task's


@dataclass(frozen=True)
class Disk:
    folder: Path
    mounted: bool

    @property
    def how(self) -> str:
        return "tmpfs 1 MiB, filled" if self.mounted else f"no mount permitted: file size limit {FILE_LIMIT_BYTES} B"

    @property
    def max_file_bytes(self) -> int | None:
        return None if self.mounted else FILE_LIMIT_BYTES

    def fill(self) -> None:
        """Write a filler file until the tmpfs is full (nothing to do under a file size limit)."""
        if not self.mounted:
            return
        fd = os.open(self.folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)


@contextlib.contextmanager
def disk_that_fills(parent: Path) -> Iterator[Disk]:
    """A 1 MiB tmpfs at parent/"adapted" if mounting is permitted, else a plain folder there."""
    folder = parent / "adapted"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield Disk(folder, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


class FaultPhase:
    def __init__(self, base: str, disk: Disk, tasks: list[str]):
        self.base = base
        self.disk = disk
        self.folder = disk.folder
        self.tasks = tasks  # pretrained tasks of the fault server: they must keep answering
        self.statuses: Counter[str] = Counter()  # "other 200", "broken 409", ...
        self.fivexx: list[str] = []
        self.other_failed: list[str] = []
        self.job: dict = {}

    async def run(self, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=120) as http:
            composed = await http.post("/tasks", json={"name": COMPOSED, "mix": dict.fromkeys(self.tasks[:2], 1)})
            self._count("setup", composed)
            if composed.status_code != 201:
                raise RuntimeError(f"the fault phase could not compose its task: {composed.status_code} "
                                   f"{composed.text[:200]}")
            self.disk.fill()
            self.job = await self._failing_job(http)
            path = self.folder / f"{COMPOSED}.safetensors"
            os.truncate(path, path.stat().st_size // 2)  # needs no room, and a file's own mode allows it
            await asyncio.gather(*(self._stream(http, deadline, i) for i in range(CLIENTS)))

    async def _failing_job(self, http: httpx.AsyncClient) -> dict:
        shots = [{"input": f"fault {i}", "target": f"{i} tluaf"} for i in range(8)]
        submitted = await http.post("/adapt", json={"task": "faults-full", "examples": shots, "steps": 3})
        self._count("adapt", submitted)
        if submitted.status_code != 202:
            return {"state": f"refused {submitted.status_code}", "error": submitted.text[:200]}
        while True:
            job = (await http.get(f"/adapt/{submitted.json()['id']}")).json()
            if job["state"] not in ("queued", "running"):
                return job
            await asyncio.sleep(0.1)

    async def _stream(self, http: httpx.AsyncClient, deadline: float, worker: int) -> None:
        i = worker
        while time.monotonic() < deadline:
            task = COMPOSED if i % 3 == 0 else self.tasks[i % len(self.tasks)]
            paced = asyncio.create_task(asyncio.sleep(PACE_S))
            response = await http.post("/generate", json={"task": task, "inputs": f"fault {i}", "max_new_tokens": 8})
            self._count("broken" if task == COMPOSED else "other", response)
            await paced
            i += CLIENTS

    def _count(self, what: str, response: httpx.Response) -> None:
        self.statuses[f"{what} {response.status_code}"] += 1
        detail = f"{what} {response.status_code} {response.text[:160]}"
        if response.status_code >= 500:
            self.fivexx.append(detail)
        if what == "other" and response.status_code != 200:
            self.other_failed.append(detail)

    def result(self) -> dict:
        error = self.job.get("error") or ""
        return {
            "faults_disk": self.disk.how,
            "faults_5xx": len(self.fivexx),
            "faults_other_tasks_failed": len(self.other_failed),
            "faults_adapt_job": self.job.get("state"),
            "faults_adapt_error_names_folder": str(self.folder) in error,
            "faults_answers": dict(sorted(self.statuses.items())),
            "faults_first_errors": (self.fivexx + self.other_failed)[:3],
        }

    def passed(self) -> bool:
        """No 5xx, no other task failed, the job failed naming the folder, the broken task answered 409."""
        result = self.result()
        return (result["faults_5xx"] == 0 and result["faults_other_tasks_failed"] == 0
                and result["faults_adapt_job"] == "failed" and result["faults_adapt_error_names_folder"]
                and self.statuses["broken 409"] > 0)
