#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device call: fill device_data/ (git-ignored) with what the GPU machine
# lacks, the wheels of `datasets` and the benchmark parquet files.
#
#   bench/device/prepare_carry.sh fashion_mnist cifar10 mnist  # then carry device_data/whl, device_data/<name>...
#
# The GPU machine has torch, timm, accelerate, huggingface_hub, pyarrow, pandas and xxhash, not datasets, dill or
# multiprocess. One call carries at most 64 MiB with the checkout (1 MiB): the wheels (2 MiB), cifar10 (18 MiB), and
# fashion_mnist and mnist repacked with the same pixels by repack_parquet.py (31 -> 29 MiB, 13 -> 10 MiB) fit together
# (59 MiB; as copied, 64.5 MiB would not).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
shared=${TIMM_ASGE_SHARED_DATA:-../shared/data}
exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
mkdir -p "$(dirname "$exclude")" device_data/whl
grep -qxF '/device_data/' "$exclude" 2>/dev/null || echo '/device_data/' >> "$exclude"
# Two wheel sets, one of which run.sh installs by the GPU machine's pyarrow: datasets 5.0 needs pyarrow >= 21 (it
# fails at import on pyarrow 17), datasets 4.0 takes pyarrow >= 15. Both were run here against torch 2.11, timm 1.0.29,
# huggingface_hub 1.33 and fsspec 2026.9 (newer than either pins); 5.0 with pyarrow 21 and 26, 4.0 with 17 and 26.
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
[ -n "$(ls device_data/whl/pyarrow21 2>/dev/null)" ] ||
  download device_data/whl/pyarrow21 datasets==5.0.0 dill==0.4.0 multiprocess==0.70.18
[ -n "$(ls device_data/whl/pyarrow15 2>/dev/null)" ] ||
  download device_data/whl/pyarrow15 datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16
for name in "$@"; do
  [ -d "$shared/$name" ] || { echo "error: no $shared/$name (set TIMM_ASGE_SHARED_DATA)" >&2; exit 1; }
  rm -rf "device_data/$name" && cp -r --no-preserve=mode "$shared/$name" "device_data/$name"
  python3 bench/device/repack_parquet.py "device_data/$name"
done
du -sh device_data/* | sed 's/^/  /'
