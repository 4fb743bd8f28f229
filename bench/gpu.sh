#!/usr/bin/env bash
# Everything that needs a GPU, in one run on a lent machine (the device tool's `run`; each part's limit below adds up to
# 9.8 minutes, and on an H200 on 2026-12-04 the whole script took 287 s after a machine start of about 30 s):
# the gpu-marked tests; the decoding step against the bare forward (engine_core.py --only step) paged — with what each
# step launches (--profile: kernels per step and the costliest, ours with 16 tasks, with none, and the bare forward) —
# and with CUDA graphs; the serving benchmark on CUDA (--quick, HTTP included) with CUDA graphs and without; gathered joins on and
# off over HTTP (bench/gather_joins.py, CUDA graphs on). Each part has its own
# time limit and a failing part does not stop the next; every part's output also goes to $OUT when set.
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=590)
# That machine has its own Python with torch and transformers but not this project's web stack (nor our
# transformers / huggingface_hub versions); those travel as wheels in .whl (ignored by git), made here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
#     fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
#     python-dotenv==1.2.4 uvicorn==0.55.0 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 opentelemetry-api==1.45.2 peft==0.21.2 llguidance==1.9.1 regex==2026.11.19
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, fastapi, peft, llguidance; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)" || exit 1  # nothing below can run without these

part() {  # part SECONDS NAME COMMAND...: run it within SECONDS, its output to $out/NAME, go on whatever it returns
  local seconds=$1 name=$2; shift 2
  local start=$SECONDS
  echo "== $name"
  timeout -k 10 "$seconds" "$@" 2>"/tmp/$name.err" | tee "$out/$name"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
  { echo "== $name"; cat "/tmp/$name.err"; } >>"$out/errors.log"  # every part's stderr, in one file
  grep -qE "Error|Traceback" "/tmp/$name.err" && tail -n 30 "/tmp/$name.err"
  return 0
}

part 150 gpu-tests.log python3 -m pytest -q -p no:cacheprovider -m gpu -o faulthandler_timeout=60 tests/server/test_gpu.py \
  tests/server/test_engine_churn.py  # the churn last: the step with CUDA graphs under preemption, beams, cancellations
part 70 step-paged.json python3 bench/engine_core.py --device cuda --only step --quick --profile 12
part 60 step-cuda-graphs.json python3 bench/engine_core.py --device cuda --only step --quick --static-step cuda-graphs
part 130 serving-cuda-graphs.json python3 bench/serving.py --device cuda --quick --skip-demo --cuda-graphs on
part 100 serving-cuda.json python3 bench/serving.py --device cuda --quick --skip-demo --cuda-graphs off
part 80 gather-joins.json python3 bench/gather_joins.py --device cuda --rounds 1  # 2 demo servers; 2 rounds (4) took over 80 s
