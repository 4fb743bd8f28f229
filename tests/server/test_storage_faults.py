"""A disk that refuses writes, for real (a tiny tmpfs mounted over the adapted folder, filled up or remounted
read-only; we run as root, so chmod would not stop a write): /adapt ends failed naming the folder, POST /tasks and
export answer 507 (full) or 503 (read-only) naming it, nothing partial is left, earlier versions are intact and the
server keeps serving. Skipped where mounting is not permitted."""

import asyncio
import contextlib
import errno
import os
import subprocess
import tempfile

import pytest

from server.app import create_app
from tests.server.conftest import await_job, bundle_settings, serving

EXAMPLES = [{"input": f"in {i}", "target": "out"} for i in range(8)]
PROBE = {"task": "kept", "inputs": "abc", "max_new_tokens": 6}


@pytest.fixture
def mount(tmp_path):
    """A 1 MiB tmpfs at tmp_path/"adapted"; `mount.fill()` fills it, `mount.read_only()` remounts it read-only."""
    folder = tmp_path / "adapted"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield Mount(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


class Mount:
    def __init__(self, folder):
        self.folder = folder

    def fill(self) -> None:
        """Write a filler file until the disk is full."""
        fd = os.open(self.folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.folder)], check=True)

    def files(self) -> dict[str, bytes]:
        """Every file under the folder (.jobs too) by relative path, with its bytes."""
        return {str(path.relative_to(self.folder)): path.read_bytes()
                for path in sorted(self.folder.rglob("*")) if path.is_file() and path.name != "filler"}


@contextlib.contextmanager
def _temp_dir(folder):
    """Export stages its zip in the system temp folder: point it at `folder`."""
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


def test_a_full_disk_fails_the_job_refuses_compose_and_export_and_keeps_serving(t5_bundle, mount):
    asyncio.run(_refused(t5_bundle, mount, mount.fill, 507, "storage_full", "No space left on device"))


def test_a_read_only_folder_fails_the_job_refuses_writes_and_keeps_serving(t5_bundle, mount):
    asyncio.run(_refused(t5_bundle, mount, mount.read_only, 503, "storage_unavailable", "Read-only file system"))


async def _refused(t5_bundle, mount, break_disk, status, type_, reason):
    async with serving(create_app(bundle_settings(t5_bundle, adapted_dir=mount.folder))) as http:
        job = (await http.post("/adapt", json={"task": "kept", "examples": EXAMPLES, "steps": 2})).json()
        assert (await await_job(http, job["id"]))["state"] == "succeeded"
        before = (await http.post("/generate", json=PROBE)).json()
        break_disk()
        on_disk = mount.files()

        for body in ({"task": "new", "examples": EXAMPLES, "steps": 2},
                     {"task": "kept", "examples": EXAMPLES[:4], "steps": 2, "overwrite": True}):
            job = (await http.post("/adapt", json=body)).json()
            done = await await_job(http, job["id"])
            assert done["state"] == "failed" and str(mount.folder) in done["error"] and reason in done["error"]
        composed = await http.post("/tasks", json={"name": "ab", "mix": {"alpha": 1, "beta": 1}})
        assert composed.status_code == status and composed.json()["error"]["type"] == type_
        assert str(mount.folder) in composed.json()["error"]["message"]
        with _temp_dir(mount.folder):
            exported = await http.get("/tasks/kept/lora")
        assert exported.status_code == status and str(mount.folder) in exported.json()["error"]["message"]

        assert mount.files() == on_disk  # nothing partial, kept's file as it was
        assert (await http.get("/tasks/kept")).json()["version"] == 1
        assert (await http.get("/tasks/new")).status_code == 404
        assert (await http.post("/generate", json=PROBE)).json() == before
        assert (await http.get("/readyz")).status_code == 200


def test_deleting_on_a_read_only_folder_is_refused_and_the_task_stays(t5_bundle, mount):
    asyncio.run(_delete_read_only(t5_bundle, mount))


async def _delete_read_only(t5_bundle, mount):
    async with serving(create_app(bundle_settings(t5_bundle, adapted_dir=mount.folder))) as http:
        assert (await http.post("/tasks", json={"name": "ab", "mix": {"alpha": 1, "beta": 1}})).status_code == 201
        mount.read_only()
        refused = await http.delete("/tasks/ab")
        assert refused.status_code == 503 and str(mount.folder) in refused.json()["error"]["message"]
        assert (await http.get("/tasks/ab")).json()["kind"] == "composed"
        assert (await http.post("/generate", json={**PROBE, "task": "ab"})).status_code == 200
