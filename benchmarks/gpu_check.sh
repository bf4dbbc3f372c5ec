#!/usr/bin/env bash
# Every GPU figure of the open issues in one command for the device tool (under 8 minutes on one H100/H200).
#
# Here, once (needs pip's index; the wheels and the CMU slide go to ignored folders that the call carries):
#     bash benchmarks/gpu_check.sh --fetch
# Then, with the device tool:
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=540)
# Results: $OUT/gpu_check.json, gpu_check.md and gpu_check.log (per-step files stay in a temp folder). Here, without a GPU:
#     bash benchmarks/gpu_check.sh --dry      # the same steps at tiny sizes on the CPU
# Either takes gpu_check.py's options after it, e.g. `--only decode embed embedder_phase scale` (#24).
set -o pipefail
cd "$(dirname "$0")/.."

if [ "$1" = "--fetch" ]; then
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    grep -qx '/.gpu_data/' .git/info/exclude || echo /.gpu_data/ >> .git/info/exclude
    mkdir -p .whl .gpu_data
    # what the GPU image lacks (it has torch, timm, cupy, scipy, tifffile, safetensors, matplotlib, pillow); not
    # nvidia-nvimgcodec (25 MB, only for GPU JPEG decode, which is slower than cuCIM's CPU threads): the carry limit is 64 MiB
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
        monai==1.6.1 pytorch-ignite==0.5.5 cucim-cu13==26.10.0 imagecodecs fire termcolor openslide-python openslide-bin || exit 1
    cp -n ../shared/data/CMU-1-Small-Region.svs .gpu_data/ 2>/dev/null
    # the 8192x6144 benchmark slide (7.7 MB), rendered here once so the device does not spend ~2 min drawing it
    ICMIL_BENCH_CACHE=.gpu_data PYTHONPATH=benchmarks ${PYTHON:-.venv/bin/python} -c \
        "import monai_icmil; from bench_data import bench_slide; print(bench_slide('.gpu_data')[0])" || exit 1
    du -sh .whl .gpu_data
    exit 0
fi

PY=${PYTHON:-python3}
if [ "$1" = "--dry" ]; then
    PY=${PYTHON:-.venv/bin/python}
    export ICMIL_BENCH_CACHE=$PWD/.gpu_data
    exec $PY benchmarks/gpu_check.py --dry --out "${OUT:-/tmp/gpu_check_dry}" "${@:2}"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 ICMIL_CMU_SLIDE=$PWD/.gpu_data/CMU-1-Small-Region.svs ICMIL_BENCH_CACHE=$PWD/.gpu_data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, monai, cucim; print('torch', torch.__version__, 'monai', monai.__version__, 'cucim', cucim.__version__)" || exit 1
mkdir -p "${OUT:=/tmp/gpu_check}"
$PY benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
