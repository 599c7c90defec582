#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device call: fill device_data/ (git-ignored) with what the GPU machine
# lacks, the wheels of `datasets` and the benchmark parquet files.
#
#   bench/device/prepare_carry.sh fashion_mnist mnist      # then carry: device_data/whl device_data/fashion_mnist ...
#
# The GPU machine has torch, timm, accelerate, huggingface_hub, pyarrow, pandas and xxhash, not datasets, dill or
# multiprocess. One call carries at most 64 MiB with the checkout: fashion_mnist (31 MiB) and mnist (14 MiB) fit
# together, cifar10 (18 MiB) goes in a second call.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
shared=${TIMM_ASGE_SHARED_DATA:-../shared/data}
exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
mkdir -p "$(dirname "$exclude")" device_data/whl
grep -qxF '/device_data/' "$exclude" 2>/dev/null || echo '/device_data/' >> "$exclude"
if [ -z "$(ls device_data/whl 2>/dev/null)" ]; then
  # datasets 5.0 still accepts huggingface_hub 1.x (the GPU machine has 1.33); Python there is 3.12.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d device_data/whl datasets==5.0.0 dill==0.4.0 multiprocess==0.70.18
fi
for name in "$@"; do
  [ -d "$shared/$name" ] || { echo "error: no $shared/$name (set TIMM_ASGE_SHARED_DATA)" >&2; exit 1; }
  rm -rf "device_data/$name" && cp -r "$shared/$name" "device_data/$name"
done
du -sh device_data/* | sed 's/^/  /'
