#!/usr/bin/env bash
# Two workers search one study in a shared journal file, then `lrsearch finalize` fine-tunes,
# verifies and saves the best configuration they found. Run from anywhere:
#
#   bash examples/distributed_search.sh                 # 120 trials in total
#   LRSEARCH_SMALL=1 bash examples/distributed_search.sh  # a quick check (8 trials, 1 epoch)
#
# Environment: RUN_DIR (default lrsearch-runs/distributed-example), LRSEARCH (the command,
# default `lrsearch`; e.g. "python -m lrsearch"), CONFIG (default mnist1d_mlp, a built-in config).
# A journal file serves processes on one machine; across machines use a database URL
# (the built-in config distributed_postgres).
set -euo pipefail

LRSEARCH=${LRSEARCH:-lrsearch}
RUN_DIR=${RUN_DIR:-lrsearch-runs/distributed-example}
CONFIG=${CONFIG:-mnist1d_mlp}
STORAGE="journal:$RUN_DIR/study.log"
STUDY=mnist1d-mlp

if [[ "${LRSEARCH_SMALL:-0}" == 1 ]]; then
  SIZE=(--search.n_trials 8 --search.objective macs --finetune.epochs 1 --finetune.progress false)
else
  SIZE=(--search.n_trials 120)
fi
# The same arguments for every worker and for finalize: the same data, budget and study.
COMMON=(--config "$CONFIG" --storage "$STORAGE" --study-name "$STUDY" --run_dir "$RUN_DIR" "${SIZE[@]}")

mkdir -p "$RUN_DIR"
pids=()
for index in 0 1; do
  # Worker 0 creates the study (and measures the latency table); the others wait for it.
  $LRSEARCH worker "${COMMON[@]}" --worker-index "$index" > "$RUN_DIR/worker$index.log" 2>&1 &
  pids+=($!)
done
echo "workers ${pids[*]} searching study $STUDY in $STORAGE (logs: $RUN_DIR/worker*.log)"
for index in 0 1; do
  status=0
  wait "${pids[$index]}" || status=$?
  # 0: the study has a feasible configuration; 1: not yet (finalize then reports it); 2: bad input.
  if [[ $status -ge 2 ]]; then
    echo "worker $index failed (exit $status):" >&2
    tail -n 5 "$RUN_DIR/worker$index.log" >&2
    exit "$status"
  fi
done

# Fine-tune, verify on the test split and save; runs no new trials. Exit 0 if the budget holds.
$LRSEARCH finalize "${COMMON[@]}"
