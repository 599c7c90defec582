#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the device tool), from the checkout's root, after bench/device/prepare_carry.sh here:
#
#   bench/device/run.sh suite                          # gpu_suite.py: throughput, peak memory, FLOP use, profile
#   bench/device/run.sh suite --compile --batch-sizes 512 1024 --no-profile
#   bench/device/run.sh train fashion_mnist [key=value ...]   # recipe on device_data/fashion_mnist, fast settings
#
# Writes what comes back into $OUT (flat: the device tool returns at most 8 files, two folders deep): the suite's
# JSON, and per training run its log, results.json (history with per-epoch step time and test accuracy) and plot;
# with RETURN_WEIGHTS=1 also the exported model (timm Hub layout) in 15 MiB parts.
# The recipe's fast settings below are overridable by later key=value arguments.
set -uo pipefail
: "${OUT:=/tmp/out}"
mkdir -p "$OUT"
# The tree arrives without .git: name the commit (TIMM_ASGE_COMMIT=$(git rev-parse HEAD), from here) in the command.
export TIMM_ASGE_COMMIT=${TIMM_ASGE_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
[ -n "$TIMM_ASGE_COMMIT" ] || echo "warning: no commit known; set TIMM_ASGE_COMMIT=<hash> in the command" >&2
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TIMM_ASGE_CACHE=/tmp/timm_asge_cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -d device_data/whl ] && ! python3 -c 'import datasets' 2>/dev/null; then
  wheels=device_data/whl/pyarrow21
  python3 -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) < 21)' ||
    wheels=device_data/whl/pyarrow15
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import torch, timm, accelerate, huggingface_hub, pyarrow; print("torch", torch.__version__, "timm", timm.__version__,
"accelerate", accelerate.__version__, "hub", huggingface_hub.__version__, "pyarrow", pyarrow.__version__,
"cuda", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
stage=${1:?usage: run.sh suite|train DATASET [key=value ...]}
shift
case $stage in
  suite)
    python3 bench/gpu_suite.py --out "$OUT/gpu_suite$(printf '%s' "$*" | tr -c 'a-z0-9' '_' | cut -c1-40).json" "$@"
    ;;
  train)
    dataset=${1:?usage: run.sh train DATASET [key=value ...]}
    shift
    data=()
    [ -d "device_data/$dataset" ] && data=(data.path="device_data/$dataset")
    python3 recipes/train.py --config "recipes/configs/$dataset.yaml" "${data[@]}" output_dir="/tmp/runs/$dataset" \
      train.mixed_precision=bf16 train.channels_last=true train.compile=true train.checkpoint_epochs=1000 \
      train.test_every_epoch=true train.eval_batch_size=2000 "$@" 2>&1 | tee "$OUT/$dataset.log" || exit 1
    cp "/tmp/runs/$dataset/results.json" "$OUT/$dataset-results.json"
    cp "/tmp/runs/$dataset/block_accuracy.png" "$OUT/$dataset-block_accuracy.png"
    if [ "${RETURN_WEIGHTS:-0}" = 1 ]; then
      # The tool returns files of at most 16 MiB (asge_cnn's weights are 37 MB): the export folder comes back as
      # 15 MiB parts. Here: cat <dataset>-export.tar.part-* | tar -xf - -C outputs/<dataset>/
      tar -C "/tmp/runs/$dataset" -cf - export | split -b 15m - "$OUT/$dataset-export.tar.part-"
    fi
    ;;
  *)
    echo "unknown stage $stage: use suite or train" >&2
    exit 2
    ;;
esac
