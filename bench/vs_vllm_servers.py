"""The two server processes of bench/vs_vllm.py: ours (`python -m server`) and vLLM's OpenAI server (in its own venv),
each in a new process group on a free loopback port; they are stopped by that group only (never by name).

Linux only: peak RSS is read from /proc (VmHWM of the server process and of every process under it, summed: vLLM runs
its API server, engine core and worker as separate processes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serving_http import free_port

ROOT = Path(__file__).resolve().parent.parent
VLLM_ENV_DIR = Path(__file__).resolve().parent / "vllm_env"
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/"
                  "libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4")
VLLM_BASE_NAME = "base"  # --served-model-name of the bare model on vLLM


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    ready_after_s: float = 0.0
    settings: dict = field(default_factory=dict)

    def peak_rss_mb(self) -> float:
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        return round(sum(vm_hwm_kib(pid) for pid in pids) / 1024, 1)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server's process tree so far."""
        return sum(cpu_ticks(pid) for pid in [self.proc.pid, *descendants(self.proc.pid)]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_group(self.proc)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process group this script started (the server and the processes it started), SIGKILL to
    what is left of it after grace_s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_ready(server: Server, url: str, started: float, timeout_s: float) -> None:
    while time.perf_counter() - started < timeout_s:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} during start-up; its log: "
                               f"{server.log_path}\n{tail(server.log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                server.ready_after_s = round(time.perf_counter() - started, 2)
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_group(server.proc)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s; its log: {server.log_path}\n"
                       f"{tail(server.log_path)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def launch(name: str, argv: list[str], env: dict[str, str], log_path: Path, port: int) -> tuple[Server, float]:
    log = log_path.open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, proc, f"http://127.0.0.1:{port}", log_path), started


def start_ours(model: Path, inventory: Path, work: Path, threads: int, timeout_s: float = 300) -> Server:
    port = free_port()
    settings = {"MHR_MODEL": str(model), "MHR_INVENTORY": str(inventory), "MHR_ADAPTED_DIR": str(work / "adapted"),
                "MHR_PORT": str(port), "MHR_DEVICE": "cpu", "MHR_DTYPE": "float32", "MHR_MAX_BATCH_SIZE": "16",
                "MHR_MAX_INPUT_TOKENS": "1024", "MHR_THREADS": str(threads), "MHR_LOG_LEVEL": "warning"}
    env = {**os.environ, **settings, "HF_HUB_OFFLINE": "1"}
    server, started = launch("ours", [sys.executable, "-m", "server"], env, work / "ours.log", port)
    server.settings = settings
    wait_ready(server, f"{server.base_url}/readyz", started, timeout_s)
    return server


def vllm_runtime_env(vllm_python: Path, threads: int, bind: str) -> dict[str, str]:
    """vLLM's recommended CPU runtime: its Intel OpenMP (libiomp5.so from the venv) and tcmalloc preloaded, the KV
    cache size set, the OpenMP threads bound to cores ("auto": vLLM's default, which keeps one core for its API
    server and warns below that; "all": every core, as ours uses)."""
    preload = [p for p in TCMALLOC_PATHS if Path(p).exists()]
    iomp = Path(vllm_python).parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        preload.append(str(iomp))
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(VLLM_ENV_DIR), "LD_PRELOAD": ":".join(preload)}
    if bind == "all":
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return env


def start_vllm(vllm_python: Path, model: Path, loras: dict[str, Path], work: Path, threads: int, bind: str,
               timeout_s: float = 600) -> Server:
    port = free_port()
    modules = [f"{name}={path}" for name, path in loras.items()]
    argv = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", VLLM_BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "16", "--enable-prefix-caching",
            "--enable-lora", "--max-loras", str(len(loras)), "--max-lora-rank", "8", "--lora-modules", *modules]
    runtime = vllm_runtime_env(vllm_python, threads, bind)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | runtime
    server, started = launch("vllm", argv, env, work / "vllm.log", port)
    server.settings = {**runtime, "argv": " ".join(argv[1:]).replace(" --lora-modules " + " ".join(modules),
                                                                      f" --lora-modules <{len(modules)} tasks>")}
    wait_ready(server, f"{server.base_url}/v1/models", started, timeout_s)
    return server
