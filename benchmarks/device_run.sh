#!/usr/bin/env bash
# The GPU run of the model-path benchmark, as one script for a lent GPU machine
# (no network there): the runtime wheels travel in .whl/ and the generated code
# in the packages' _gen/ folders (build them here first with `nox -s codegen`).
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl \
#       transformers==5.24.0 grpcio==1.85.3 grpcio-status==1.85.3 protobuf==7.36.2 \
#       googleapis-common-protos==1.76.0 betterproto2==0.10.0 regex==2026.11.19 \
#       grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 prometheus-client==0.26.0
#
# STREAMS (default 1,64) picks the GPU concurrencies; CPU=0 skips the CPU run.
# Writes the log and the JSON results to $OUT (or benchmarks/results/).
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/packages/entity-llm-server/src:$PWD/packages/entity-llm-client/src
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, grpc; print(sys.version.split()[0], torch.__version__, transformers.__version__, grpc.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 75 python3 benchmarks/cuda_check.py --device cuda 2>&1 | grep -v "it/s]" | tee "$OUT/cuda_check.log"
timeout 300 python3 benchmarks/model_path.py --device cuda --dtype bfloat16 --models qwen2-0.5b \
    --streams "${STREAMS:-1,64}" --new-tokens 128 --sequential-limit 8 --repeat 1 --compare-in-process \
    --compare-no-graphs --compare-sampling 2>&1 \
    | grep -v "it/s]" | tee "$OUT/cuda.log"
cp benchmarks/results/model_path_cuda.json "$OUT/" 2>/dev/null
# The CPU comparison on this machine's 16 cores (the GPU hidden), if time is left.
[ "${CPU:-1}" = 0 ] && exit 0
CUDA_VISIBLE_DEVICES="" timeout 110 python3 benchmarks/model_path.py --models demo,llama-35m --streams 32 \
    --sequential-limit 4 --repeat 1 --compare-in-process 2>&1 | grep -v "it/s]" | tee "$OUT/cpu16.log"
cp benchmarks/results/model_path_cpu.json "$OUT/model_path_cpu16.json" 2>/dev/null
exit 0
