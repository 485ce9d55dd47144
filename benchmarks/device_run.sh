#!/usr/bin/env bash
# The GPU run of the benchmarks, as one script for a lent GPU machine (no
# network there): the runtime wheels travel in .whl/ and the generated code in
# the packages' _gen/ folders (build them here first with `nox -s codegen`).
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl \
#       transformers==5.24.0 grpcio==1.85.3 grpcio-status==1.85.3 protobuf==7.36.2 \
#       googleapis-common-protos==1.76.0 betterproto2==0.10.0 regex==2026.11.19 \
#       grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 prometheus-client==0.26.0
#
# At most about 6 minutes (the timeouts below add up to 350 s). model_path
# compares raw CB as the server sizes it, with the sampling hook, with `--attention varlen`
# (cuda_check checks it first) and with async batching (sdpa and varlen), and the server (engine
# process, varlen); each raw CB side prints CUDA-event device time per step against the
# host's share of the step. STREAMS
# (default 64) picks model_path's concurrencies, the target's first; then
# engine replicas 1, 2 and 4 on the one GPU at 64 and 256 streams. A run cut
# short keeps the settings it finished in model_path_cuda.json and
# scale_cuda.json. Writes the logs and the JSON results to $OUT (or
# benchmarks/results/). NEW_TOKENS (default 128) and SCALE_STREAMS (default
# 64,256) shrink the run for a CPU dry run of the script itself:
#   sed -e '/pip install/d' -e 's/--device cuda/--device cpu/g' -e 's/bfloat16/float32/g' \
#       -e 's/qwen2-0.5b/demo/g' benchmarks/device_run.sh > /tmp/dry.sh
#   STREAMS=8 SCALE_STREAMS=8,16 NEW_TOKENS=16 OUT=/tmp/dry bash /tmp/dry.sh
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/packages/entity-llm-server/src:$PWD/packages/entity-llm-client/src
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, grpc; print(sys.version.split()[0], torch.__version__, transformers.__version__, grpc.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 60 python3 benchmarks/cuda_check.py --device cuda 2>&1 | grep -v "it/s]" | tee "$OUT/cuda_check.log"
timeout 175 python3 benchmarks/model_path.py --device cuda --dtype bfloat16 --models qwen2-0.5b \
    --streams "${STREAMS:-64}" --new-tokens "${NEW_TOKENS:-128}" --sequential-limit 4 --repeat 2 \
    --compare-sampling --compare-attention --compare-async 2>&1 | grep -v "it/s]" | tee "$OUT/cuda.log"
cp benchmarks/results/model_path_cuda.json "$OUT/" 2>/dev/null
timeout 115 python3 benchmarks/scale.py --device cuda --dtype bfloat16 --models qwen2-0.5b --replicas 1,2,4 \
    --streams "${SCALE_STREAMS:-64,256}" --tp-streams none --pods none --new-tokens "${NEW_TOKENS:-128}" --prompt-tokens 64 \
    --max-batch-size 256 --max-queue 256 --repeat 1 2>&1 | grep -v "it/s]" | tee "$OUT/scale_cuda.log"
cp benchmarks/results/scale_cuda.json "$OUT/" 2>/dev/null
exit 0
