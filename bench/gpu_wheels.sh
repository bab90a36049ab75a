#!/usr/bin/env bash
# Download, here, the wheels bench/gpu_check.py needs on the lent H200 into .whl/ (ignored by git),
# and print their sizes and what would travel with the working tree.
#
# That machine (Python 3.12, torch 2.11+cu130) has numpy, numba, pyarrow, safetensors 0.8, typer,
# rich, matplotlib, pillow, huggingface-hub 1.33, regex, requests and filelock, and can download
# nothing. It lacks:
#   polars                        catalog scans in nr train (Catalog.scan) and nr catalog
#   diffusers                     AutoencoderDC for the catalog's encoder, nr sample's decoder and the encode section
#   importlib-metadata            a Requires-Dist of diffusers that the image does not hold (zipp, its own need, is there)
#   torch-fidelity                the TF-ported InceptionV3 of nr eval (gpu_check's eval section); pure Python, and
#                                 nreval imports its Inception module alone, so its torchvision and tqdm are not needed
# scipy is left behind too (about 35 MiB): only FID's sqrtm needs it, on the CPU, and the eval section times no FID.
# Ray is left behind on purpose: its wheel alone is larger than the 64 MiB the working tree may weigh,
# and gpu_check.py needs none of it. polars is 1.31, the last single-wheel release (33 MiB): from 1.34 on
# its engine ships as polars-runtime-32, 51 MiB for 2.1 alone, which with the rest would nearly fill the
# 64 MiB; nr uses only scan_parquet/select/filter/collect, the same in 1.31 (`bench/gpu_wheels.sh --check`
# runs the smoke check against exactly these wheels here). diffusers is the version `./run setup`
# installs here; it asks huggingface-hub >= 1.32 and safetensors >= 0.8, both met there.
#
# Usage (repo root): bash bench/gpu_wheels.sh [--check]
#   --check  then install exactly these wheels into a scratch folder ahead of .venv's packages and run
#            `bench/gpu_check.py --smoke` against them, as the device will import them
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(polars==1.31.0 diffusers==0.42.1 importlib-metadata==10.2.0 torch-fidelity==0.4.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 any)

grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qxF /gpu-check-out/ .git/info/exclude 2>/dev/null || echo /gpu-check-out/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none ${PLATFORMS[@]/#/--platform } -d .whl "${WHEELS[@]}"

ls -l .whl | awk 'NR > 1 {printf "%8.1f MiB  %s\n", $5 / 2^20, $9}'
echo "wheels: $(du -cb .whl/*.whl | tail -1 | awk '{printf "%.1f MiB", $1 / 2^20}')"
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels (tracked + untracked-not-ignored): $(awk -v b="$tree" 'BEGIN {printf "%.1f MiB", b / 2^20}')"
echo "with the wheels: $(du -cb .whl/*.whl | tail -1 | awk -v b="$tree" '{printf "%.1f MiB of 64 MiB", ($1 + b) / 2^20}')"

if [ "${1:-}" = "--check" ]; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" .whl/*.whl
  PYTHONPATH="$site" .venv/bin/python bench/gpu_check.py --smoke --out "$site/out"
fi
