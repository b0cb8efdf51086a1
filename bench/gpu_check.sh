#!/usr/bin/env bash
# The GPU check as one command on a one-GPU machine with PyTorch but without Ray, vLLM or internet.
#
#   make gpu-wheels               # here, once: the pinned wheels the GPU machine lacks, into .whl/ (about 22 MiB)
#   bash bench/gpu_check.sh       # there, from the repo root, with .whl/ beside it: prints one JSON summary
#
# Installs .whl/ (DeepSpeed, pydantic and its parts, hjson, regex, and the pinned transformers and peft, so the
# step runs on the library versions training pins) into a private folder, puts it and the repo root on PYTHONPATH
# and runs bench/gpu_check.py. Results go to $OUT (or outputs/gpu_check): gpu_check.json (rewritten after every
# check) and gpu_check.log (each check's stderr, TORCH_LOGS=recompiles included). BUDGET_S (default 450) bounds
# the checks' time; checks that no longer fit are listed as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${RP_RAY_WHEELS:-.whl}
out=${OUT:-outputs/gpu_check}
site=${TMPDIR:-/tmp}/rp_ray_gpu_site
mkdir -p "$out"
ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "no wheels in $wheels: run 'make gpu-wheels' on a machine with the package registry" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu_check.py --out "$out/gpu_check.json" --log "$out/gpu_check.log" --budget-s "${BUDGET_S:-450}" "$@"
