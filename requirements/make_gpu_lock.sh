#!/usr/bin/env bash
# Regenerate requirements/gpu.lock: the full resolution of the `gpu` extra (vllm==0.32.0, CUDA torch) for the
# GPU cluster's nodes (Linux x86_64, glibc >= 2.28, CPython 3.11), on any machine, without a GPU: uv resolves
# for the target platform from the package index's metadata and installs nothing.
#   bash requirements/make_gpu_lock.sh            # writes requirements/gpu.lock
# Uses `uv` from PATH, else installs uv (pinned) into a throwaway virtualenv first.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
out=requirements/gpu.lock
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

uv=$(command -v uv || true)
if [ -z "$uv" ]; then
    python3 -m venv "$tmp/uv-venv"
    "$tmp/uv-venv/bin/python" -m pip install --quiet "uv==$UV_VERSION"
    uv="$tmp/uv-venv/bin/uv"
fi

"$uv" pip compile pyproject.toml --extra gpu \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --no-annotate --no-header --quiet -o "$tmp/resolved.txt"

# The CUDA major version torch was built against decides the oldest NVIDIA driver that runs it.
cuda=$(sed -n 's/^nvidia-cuda-runtime[^=]*==\([0-9]*\)\..*/\1/p' "$tmp/resolved.txt")
case "$cuda" in
    13) driver=580 ;;
    12) driver=525 ;;
    *) echo "make_gpu_lock: cannot tell the CUDA version of the resolved torch (nvidia-cuda-runtime: '$cuda')" >&2
       exit 1 ;;
esac

{
    echo "# The \`gpu\` extra (pip install -e '.[gpu]': vllm==0.32.0 with CUDA torch), fully resolved for Linux x86_64"
    echo "# (manylinux_2_28, glibc >= 2.28) and CPython 3.11, without a GPU, on $(date -u +%F) by $("$uv" --version | cut -d" " -f1-2):"
    echo "#   uv pip compile pyproject.toml --extra gpu --python-version 3.11 --python-platform x86_64-manylinux_2_28"
    echo "# cluster.yaml's setup applies it as constraints: pip install -c requirements/gpu.lock -e '.[gpu]'."
    echo "# torch here is PyPI's CUDA $cuda build: it needs an NVIDIA driver of branch R$driver or newer"
    echo "# (cluster.yaml's worker setup checks nvidia-smi before Ray starts)."
    echo "# Regenerate after changing pyproject.toml: bash requirements/make_gpu_lock.sh"
    cat "$tmp/resolved.txt"
} > "$out"
echo "wrote $out ($(grep -cv '^#' "$out") packages, CUDA $cuda, driver >= R$driver)"
