#!/usr/bin/env bash
# carvana_jax front door.
#   ./run.sh                      set up, make synthetic data, train configs/demo.py, evaluate, submit, cut out
#   ./run.sh CONFIG [--config.k=v ...]   train CONFIG, then evaluate it (val Dice if it holds cars out) and submit
#   ./run.sh test [pytest args]   set up and run the test suite
# Set-up creates .venv (CUDA 12 jax where nvidia-smi works) and reinstalls when pyproject.toml changes;
# the test mode adds the 'torch' extra (CPU PyTorch, the reference of the pretrained-encoder tests).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

setup() {
  local extras="dev" stamp
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then extras="dev,cuda12"; fi
  stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)-$extras"
  [[ -f "$stamp,torch" || ( "$1" != test && -f "$stamp" ) ]] && return  # a test set-up serves the demo too
  if [[ "$1" == test ]]; then extras="$extras,torch"; stamp="$stamp,torch"; fi
  echo "setting up $VENV (extras: $extras) ..."
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  if ! { "$PY" -m pip install --upgrade pip && "$PY" -m pip install -e ".[$extras]"; } >"$VENV/install.log" 2>&1; then
    tail -n 20 "$VENV/install.log"
    echo "error: installing into $VENV failed; the full log is $VENV/install.log" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

train_and_evaluate() {
  local config="$1"; shift
  local name workdir
  name=$(basename "$config" .py)
  workdir="${WORKDIR:-workdirs/$name}"
  "$PY" -m carvana_jax.train --config "$config" --workdir "$workdir" "$@"
  local val_fraction
  val_fraction=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['val_fraction'])" \
    "$(ls -d "$workdir"/checkpoints/*/config/metadata | head -1)")
  if [[ "$val_fraction" != "0.0" && "$val_fraction" != "0" ]]; then
    "$PY" -m carvana_jax.eval --ckpt "$workdir" --split val
  fi
  "$PY" -m carvana_jax.eval --ckpt "$workdir" --split test --out "$workdir/submission.csv"
  echo "plots:      $workdir/plots/"
  echo "metrics:    $workdir/metrics.jsonl (and TensorBoard: tensorboard --logdir $workdir)"
  echo "submission: $workdir/submission.csv"
}

setup "${1:-}"
export PYTHONUNBUFFERED=1
case "${1:-}" in
  test)
    shift
    # two pytest workers, a test file each: one process alone keeps only ≈ 1.3 of two cores busy (compiling,
    # decoding and subprocess start-up are single-threaded). A later -n overrides it (-n 0: one process).
    exec "$PY" -m pytest -n 2 --dist loadfile "$@"
    ;;
  "")
    data=data/synthetic
    if [[ ! -f "$data/sample_submission.csv" ]]; then
      "$PY" -m carvana_jax.synthetic --out "$data" --cars 24 --test_cars 4
    fi
    train_and_evaluate configs/demo.py --config.data_dir="$data"
    demo_workdir="${WORKDIR:-workdirs/demo}"
    "$PY" -m carvana_jax.cutout --ckpt "$demo_workdir" "$data/test" --out "$demo_workdir/cutouts"
    echo "cut-outs:   $demo_workdir/cutouts/"
    ;;
  -h|--help|help)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    train_and_evaluate "$@"
    ;;
esac
