#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the device tool), from the checkout's root, after bench/device/prepare_carry.sh here:
#
#   bench/device/run.sh all                            # everything below that fits in one call (see `all` below)
#   bench/device/run.sh suite                          # gpu_suite.py: throughput, peak memory, FLOP use, profile
#   bench/device/run.sh suite --compile --batch-sizes 512 1024 --no-profile
#   bench/device/run.sh train fashion_mnist [key=value ...]   # recipe on device_data/fashion_mnist, fast settings
#   bench/device/run.sh sweep bench/device/sweep.txt  # the runs listed in the file, side by side
#
# Writes what comes back into $OUT (flat: the device tool returns at most 8 files, two folders deep): the suite's
# JSON, and per training run its log, results.json (history with per-epoch step time and test accuracy) and plot;
# with RETURN_WEIGHTS=1 also the exported model (timm Hub layout) in 15 MiB parts. `all` packs its small files into
# one $OUT/all.tar at the end. The recipe's own GPU defaults (train.*: auto) apply unless key=value arguments
# say otherwise.
set -uo pipefail
: "${OUT:=/tmp/out}"
mkdir -p "$OUT"
# The tree arrives without .git: name the commit (TIMM_ASGE_COMMIT=$(git rev-parse HEAD), from here) in the command.
export TIMM_ASGE_COMMIT=${TIMM_ASGE_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
[ -n "$TIMM_ASGE_COMMIT" ] || echo "warning: no commit known; set TIMM_ASGE_COMMIT=<hash> in the command" >&2
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TIMM_ASGE_CACHE=/tmp/timm_asge_cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
stage=${1:?usage: run.sh all | suite [gpu_suite args] | train DATASET [key=value ...] | sweep RUNS_FILE}
shift
# A mistyped STAGES stops here, before the set-up's seconds of imports.
stages=${STAGES:-suite train:fashion_mnist train:cifar10 train:mnist suite:compile recipe:fashion_mnist}
if [ "$stage" = all ]; then
  open_ended=""  # the last stage seen with a recipe: run: it runs until it ends or the budget does
  for stage_name in $stages; do
    run='(train|recipe):[a-z0-9_]+'
    [[ $stage_name =~ ^(suite|suite:compile|suite:graphs|$run|together:$run(\+$run)*)$ ]] || {
      echo "unknown stage $stage_name in STAGES: use suite, suite:compile, suite:graphs, train:DATASET," \
        "recipe:DATASET or together:train:A+recipe:B..." >&2
      exit 2
    }
    if [[ $stage_name == together:* ]] &&
      [ "$(tr + '\n' <<< "${stage_name#together:}" | sort | uniq -d)" ]; then
      echo "$stage_name in STAGES names a run twice (they would share a log and an output folder)" >&2
      exit 2
    fi
    # The authors' recipe runs 100 epochs: on real data it ends only at the budget, leaving nothing to what follows.
    [ -n "$open_ended" ] && echo "note: $stage_name comes after $open_ended, which can take all of the budget left;" \
      "it runs only if that ends first (put the stages with recipe: runs last)" >&2
    # Open-ended: a recipe: run (alone or together with others) of a real dataset; train: runs are short.
    for member in $(tr + ' ' <<< "${stage_name#together:}"); do
      [[ $member == recipe:* && $member != recipe:digits ]] && open_ended=$stage_name
    done
  done
fi
# Set-up once a call: the stages run this script again for every training run and suite (the children inherit
# RUN_SH_READY and PYTHONPATH). The versions come from the packages' metadata: importing timm (and with it torch and
# torch._dynamo) would take 4-10 s; the card's name is in every run's log and in the suite's JSON.
if [ -z "${RUN_SH_READY:-}" ]; then
  if [ -d device_data/whl ] && ! python3 -c 'import datasets' 2>/dev/null; then
    wheels=device_data/whl/pyarrow21
    python3 -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) < 21)' ||
      wheels=device_data/whl/pyarrow15
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheels"/*.whl || exit 1
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" RUN_SH_READY=1
  python3 -c 'from importlib.metadata import PackageNotFoundError, version
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:  # datasets, when no wheels were carried: the suite needs none
        return "(not installed)"
print(*(f"{name} {installed(name)}" for name in ("torch", "timm", "accelerate", "huggingface_hub", "pyarrow",
                                                 "datasets")))'
fi
case $stage in
  all)
    # The device time of a session (15 min, the machine's start included; one command at most 10 min; warm for only
    # 30 s after a call) allows one full call: the stages run most needed first, each limited to what is left of
    # BUDGET_S (timeout kills the stage's whole process group; a cut-off training run's log still has every finished
    # epoch's accuracy and time). Run the call with timeout_s=600.
    #   suite                  gpu_suite.py, eager: throughput at 128-1024, peak memory, FLOP use, profiles
    #   train:DATASET          the recipe at the fast settings FAST_ARGS (batch 512, lr scaled by 4); skipped
    #                          when its data was not carried, or when the last such run took longer than what is left
    #   suite:compile          gpu_suite.py with torch.compile at batch 512
    #   suite:graphs           gpu_suite.py with torch.compile's CUDA graphs (reduce-overhead) at batch 256 and 512
    #                          (six compilations, about 2.5 min: suite:compile's three took 77 s on the H200; its peak
    #                          memory leaves out the graphs' pool, allocated while warming up)
    #   recipe:DATASET         the recipe at the config's own batch 128 and lr (the authors'): the reference curve;
    #                          last, as it may be cut off
    #   together:A+B+...       train:/recipe: runs side by side, one process each, until all end or the budget does:
    #                          at batch 128 a lone run is launch-bound and leaves the GPU idle between its kernels,
    #                          so several together should take less than one after another (unmeasured; without MPS
    #                          the processes take turns on the GPU). Their epoch times are not a lone run's (accuracy
    #                          is unaffected). A run that fails runs again at once with RETRY_ARGS
    # A training run that fails (not cut off) is run again once with RETRY_ARGS (default train.compile=false; e.g.
    # train.compile=true, as the recipe's `auto` compiles with CUDA graphs), and so are the ones after it.
    # STAGES, TRAIN_ARGS (key=value overrides for every training stage) and SUITE_ARGS are for smaller runs.
    # train:digits and recipe:digits need no carried data (scikit-learn's copy): a CPU check of the stages.
    # BUDGET_S counts from here, after the set-up (15-30 s on the GPU machine): keep it 60 s under the call's
    # timeout_s, so the last stage's kill and the tar below still fit.
    budget=${BUDGET_S:-540}
    deadline=$((SECONDS + budget))
    fast_args=${FAST_ARGS-train.batch_size=512 train.lr=8e-4}
    train_args=${TRAIN_ARGS:-}
    retry_args=${RETRY_ARGS-train.compile=false}
    last_train_s=0
    summary="$OUT/all-stages.txt"
    : > "$summary"
    run_stage() {  # run_stage NAME COMMAND...: run within what is left of the budget; sets rc and took
      local left=$((deadline - SECONDS)) began=$SECONDS note=''
      if [ "$left" -lt "${MIN_STAGE_S:-60}" ]; then  # (timeout 0 would mean no limit at all)
        rc=124 took=0
        echo "$1: skipped, $left s of the budget left" | tee -a "$summary"
        return
      fi
      echo "== $1 (${left} s of the budget left)"
      timeout --kill-after=10 "$left" "${@:2}"
      rc=$? took=$((SECONDS - began))
      # 124: stopped at the budget; 137: killed 10 s later, as it did not stop.
      [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=' (cut off at the budget)'
      echo "$1: exit $rc$note after $took s" | tee -a "$summary"
    }
    should_retry() {  # should_retry RC ARGS: the run failed (not cut off at the budget) and RETRY_ARGS are new to it
      [ "$1" != 0 ] && [ "$1" != 124 ] && [ "$1" != 137 ] && [ -n "$retry_args" ] && [[ " $2 " != *" $retry_args "* ]]
    }
    run_name() { if [[ $1 == train:* ]]; then echo "${1#*:}"; else echo "${1#*:}-recipe"; fi; }
    training_run() {  # training_run STAGE: sets dataset, name and args of a train:/recipe: stage; 1 if not carried
      dataset=${1#*:} name=$(run_name "$1")
      if [[ $1 == train:* ]]; then args="$fast_args $train_args"; else args=$train_args; fi
      if [ "$dataset" != digits ] && [ ! -d "device_data/$dataset" ]; then
        echo "$1: skipped, device_data/$dataset was not carried" | tee -a "$summary"
        return 1
      fi
    }
    run_together() {  # run_together STAGE...: the training stages side by side, each retried on its own if it fails
      local left=$((deadline - SECONDS)) began=$SECONDS pids=() members=() i member rc took retried note
      if [ "$left" -lt "${MIN_STAGE_S:-60}" ]; then
        echo "together:$(IFS=+; echo "$*"): skipped, $left s of the budget left" | tee -a "$summary"
        return
      fi
      mkdir -p /tmp/runs
      for member in "$@"; do
        training_run "$member" || continue
        echo "== $member (together; $left s of the budget left)"
        rm -f "/tmp/runs/$name.exit"
        # Each run's output is in its own log ($OUT/NAME.log); interleaved here it would be unreadable. A run that
        # fails (not cut off) runs again at once with RETRY_ARGS, in what is left of the budget.
        (
          timeout --kill-after=10 "$left" env RUN_NAME="$name" bash "$0" train "$dataset" $args > /dev/null 2>&1
          rc=$? retried=0
          if should_retry "$rc" "$args" && [ $((deadline - SECONDS)) -ge "${MIN_STAGE_S:-60}" ]; then
            echo "$member (together): exit $rc after $((SECONDS - began)) s" | tee -a "$summary"
            [ -f "$OUT/$name.log" ] && mv "$OUT/$name.log" "$OUT/$name-failed.log"
            timeout --kill-after=10 $((deadline - SECONDS)) env RUN_NAME="$name" bash "$0" train "$dataset" $args \
              $retry_args > /dev/null 2>&1
            rc=$? retried=1
          fi
          echo "$rc $((SECONDS - began)) $retried" > "/tmp/runs/$name.exit"  # its own end, whatever the order
        ) &
        pids+=($!) members+=("$member")
      done
      for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        member=${members[$i]} name=$(run_name "${members[$i]}") note=''
        read -r rc took retried < "/tmp/runs/$name.exit" || { rc=255 took='?' retried=0; }
        [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=' (cut off at the budget)'
        if [ "$retried" = 1 ]; then
          member="$member ($retry_args)"
          [[ " $train_args " == *" $retry_args "* ]] || train_args="$train_args $retry_args"  # for later stages too
        fi
        echo "$member (together): exit $rc$note after $took s" | tee -a "$summary"
        [ -f "/tmp/runs/$name/profile.txt" ] && cp "/tmp/runs/$name/profile.txt" "$OUT/$name-profile.txt"
      done
    }
    for stage_name in $stages; do
      left=$((deadline - SECONDS))  # run_stage skips a stage when less than MIN_STAGE_S is left
      case $stage_name in
        suite) run_stage suite bash "$0" suite ${SUITE_ARGS:-} ;;
        suite:compile)
          run_stage suite:compile bash "$0" suite --compile --batch-sizes 512 --no-profile ${SUITE_ARGS:-} ;;
        suite:graphs)
          run_stage suite:graphs bash "$0" suite --compile --compile-mode reduce-overhead --batch-sizes 256 512 \
            --no-profile ${SUITE_ARGS:-} ;;
        together:*)
          IFS=+ read -ra runs <<< "${stage_name#together:}"
          run_together "${runs[@]}"
          ;;
        train:* | recipe:*)
          training_run "$stage_name" || continue
          if [[ $stage_name == train:* ]] && [ "$last_train_s" -gt "$left" ]; then
            echo "$stage_name: skipped, the last training run took $last_train_s s and $left s are left" |
              tee -a "$summary"
            continue
          fi
          run_stage "$stage_name" env RUN_NAME="$name" bash "$0" train "$dataset" $args
          if should_retry "$rc" "$args"; then
            [ -f "$OUT/$name.log" ] && mv "$OUT/$name.log" "$OUT/$name-failed.log"
            train_args="$train_args $retry_args" args="$args $retry_args"
            run_stage "$stage_name ($retry_args)" env RUN_NAME="$name" bash "$0" train "$dataset" $args
          fi
          [[ $stage_name == train:* ]] && [ "$rc" = 0 ] && last_train_s=$took
          # A run cut off at the budget was killed before `train` copied its profile (written in epoch 2).
          [ -f "/tmp/runs/$name/profile.txt" ] && cp "/tmp/runs/$name/profile.txt" "$OUT/$name-profile.txt"
          ;;
      esac
    done
    echo "all stages:" && cat "$summary"
    # One file back for all the small ones (the tool returns at most 8); weight parts stay separate (16 MiB each).
    (cd "$OUT" && find . -maxdepth 1 -type f ! -name '*.tar.part-*' ! -name all.tar -printf '%P\n' |
      tar -cf all.tar -T - --remove-files)
    ;;
  sweep)
    # sweep RUNS_FILE: every line of RUNS_FILE (NAME DATASET key=value ..., or NAME suite [gpu_suite args]) runs side
    # by side with the others until all end or BUDGET_S does; then their files go into $OUT/sweep.tar.
    budget=${BUDGET_S:-400}
    mkdir -p /tmp/sweep
    while read -r name what args; do
      [[ -z $name || $name == \#* ]] && continue
      if [ "$what" = suite ]; then run=(bash "$0" suite --out "$OUT/$name.json" $args); else
        run=(env RUN_NAME="$name" bash "$0" train "$what" $args); fi
      (timeout --kill-after=10 "$budget" "${run[@]}" > "/tmp/sweep/$name.out" 2>&1; echo "$name: exit $?") &
    done < "${1:?usage: run.sh sweep RUNS_FILE}"
    wait
    (cd "$OUT" && find . -maxdepth 1 -type f ! -name '*.tar' ! -name '*.tar.part-*' -printf '%P\n' |
      tar -cf sweep.tar -T - --remove-files)
    ;;
  suite)
    python3 -m bench.gpu_suite --out "$OUT/gpu_suite$(printf '%s' "$*" | tr -c 'a-z0-9' '_' | cut -c1-40).json" "$@"
    ;;
  train)
    dataset=${1:?usage: run.sh train DATASET [key=value ...]}
    shift
    name=${RUN_NAME:-$dataset}  # names the output folder and the files sent back
    data=()
    [ -d "device_data/$dataset" ] && data=(data.path="device_data/$dataset")
    rm -rf "/tmp/runs/$name"  # a fresh run: the recipe refuses a folder holding an earlier run's checkpoints
    python3 recipes/train.py --config "recipes/configs/$dataset.yaml" "${data[@]}" output_dir="/tmp/runs/$name" \
      train.checkpoint_epochs=1000 \
      train.test_every_epoch=true train.eval_batch_size=2000 "$@" 2>&1 | tee "$OUT/$name.log"
    status=$?
    [ -f "/tmp/runs/$name/profile.txt" ] && cp "/tmp/runs/$name/profile.txt" "$OUT/$name-profile.txt"
    [ "$status" = 0 ] || exit 1
    cp "/tmp/runs/$name/results.json" "$OUT/$name-results.json"
    cp "/tmp/runs/$name/block_accuracy.png" "$OUT/$name-block_accuracy.png"
    if [ "${RETURN_WEIGHTS:-0}" = 1 ]; then
      # The tool returns files of at most 16 MiB (asge_cnn's weights are 37 MB): the export folder comes back as
      # 15 MiB parts. Here: cat <name>-export.tar.part-* | tar -xf - -C outputs/<name>/
      tar -C "/tmp/runs/$name" -cf - export | split -b 15m - "$OUT/$name-export.tar.part-"
    fi
    ;;
  *)
    echo "unknown stage $stage: use all, suite, train or sweep" >&2
    exit 2
    ;;
esac
