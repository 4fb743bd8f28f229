#!/usr/bin/env bash
# Everything that needs a GPU, in one run of well under 8 minutes on a lent machine (the device tool's `run`):
# the gpu-marked tests, the serving benchmark on CUDA (--quick) with CUDA graphs (as served) and without (in-process
# modes only) and the head-of-line split (engine vs HTTP), printing their JSON (also to $OUT if set).
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
# That machine has its own Python with torch and transformers but not this project's web stack; those travel as
# wheels in .whl (ignored by git), made here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 fastapi==0.165.0 starlette==1.10.0 \
#     pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 uvicorn==0.54.0 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 peft==0.21.2
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/server/test_gpu.py 2>&1 | tee "$out/gpu-tests.log" || true  # the benches run anyway
python3 bench/serving.py --device cuda --quick --skip-demo --cuda-graphs on | tee "$out/serving-cuda-graphs.json"
python3 bench/serving.py --device cuda --quick --skip-demo --skip-http --cuda-graphs off | tee "$out/serving-cuda.json"
python3 bench/hol_engine.py --device cuda | tee "$out/hol-cuda.json"
