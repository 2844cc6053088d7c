#!/usr/bin/env bash
# The whole pipeline: extract CLIP features once (HDF5 caches, reused when present) -> train and evaluate CMM and
# the baselines for every dataset x shots x seeds (vmapped JAX) -> one results table (Markdown + CSV) and a plot.
# With no arguments: an offline pipeline check on Fashion-MNIST with a tiny random-weight CLIP (a few minutes).
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
usage: ./run_all.sh [options]

With no options, runs an offline pipeline check: Fashion-MNIST (Debian package, fetched at run time) with a
tiny random-weight CLIP. Its numbers check the pipeline; they are not CLIP accuracy.

  --datasets "A B ..."   benchmarks from data/ (python -m data list; any case, '-'/'_' ignored), or "all" (the
                         11 benchmarks + the 4 ImageNet shift sets) or "benchmarks" (the 11); shift sets are
                         evaluated with ImageNet's model, so they need ImageNet in the list
  --data-root DIR        folder holding the datasets (python -m data info NAME shows the layout)
  --folder DIR           instead of --datasets: your own image folder (one sub-folder per class, optionally
                         under train/ val/ test/); --name names it
  --name NAME            dataset name for --folder or --predict (default: the folder's name)
  --model NAME           open_clip model name, hf-hub:ORG/REPO or local-dir:DIR (default RN50-quickgelu, the
                         activation of OpenAI's RN50 weights, or with --model-config the config file's name;
                         the demo uses cmm-tiny-vit)
  --pretrained TAG|FILE  open_clip pretrained tag (e.g. openai) or a local weights file (.pt/.safetensors, or
                         OpenAI's TorchScript RN50.pt, ...); not with hf-hub:/local-dir:, which bring their own
  --model-config FILE    open_clip model-config JSON of a custom architecture
  --shots "K ..."        shots per class (default "1 2 4 8 16"); values above a dataset's smallest class are
                         skipped for that dataset with a warning
  --seeds "S ..."        few-shot seeds (default "1 2 3")
  --aug-views N          augmented views of each encoded train image (default 10, Tip-Adapter's: train_jax then
                         also runs tip_adapter_f and searches CMM's use_aug; 0 for neither)
  --encode-all           encode every train image (default: only those the few-shot draws of --seeds at up
                         to the largest --shots can use; rerunning with more seeds or shots adds the missing)
  --out DIR              output folder (default outputs/): cache/, runs/, results/
  --device D             auto | cpu | cuda (default auto): extraction device and JAX platform
  --train-args "..."     extra arguments for python -m train_jax (e.g. "--grid lr=1e-3,1e-4")
  --select MODE          seed | mean: settings chosen on validation (default seed); none: validation-free, each
                         method at its fixed default, no validation rows used (the tables say so)
  --compare-to METHOD    reference of the paired comparisons in the results (default cmm)
  --protocol "P ..."     few-shot (default); base-to-new (CoCoOp: train on each dataset's first half of the
                         classes, test on them and on the other half); cross-dataset (train on --source, score
                         its models on every other dataset given); several at once, e.g. "few-shot base-to-new"
  --source NAME          the cross-dataset source (default: ImageNet if given, else the first dataset)
  --predict DIR          instead of training: classify every image under DIR (any layout) with a trained run's
                         models -> OUT/predict/NAME.csv (path, top-5 classes, probabilities); give the --model
                         and --pretrained the run was trained with (none: the demo's)
  --run DIR              the run folder for --predict (default: OUT/runs/FashionMNIST, the demo's)
  --predict-args "..."   extra arguments for python -m train_jax predict (e.g. "--shots 4 --seed 1")
  -h, --help             this help
EOF
}

DATASETS="" DATA_ROOT="" FOLDER="" NAME="" MODEL="" PRETRAINED="" MODEL_CONFIG=""
SHOTS="1 2 4 8 16" SEEDS="1 2 3" AUG_VIEWS=10 OUT="outputs" DEVICE="auto" TRAIN_ARGS="" ENCODE_ALL=0
PREDICT="" RUN="" PREDICT_ARGS="" COMPARE_TO="cmm" PROTOCOL="few-shot" SOURCE="" SELECT="seed"
PY="${PYTHON:-python}"

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --encode-all) ENCODE_ALL=1; shift ;;
    --datasets|--data-root|--folder|--name|--model|--pretrained|--model-config|--shots|--seeds|--aug-views|\
    --out|--device|--train-args|--predict|--run|--predict-args|--compare-to|--protocol|--source|--select)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)"
      case "$1" in
        --datasets) DATASETS="$2" ;; --data-root) DATA_ROOT="$2" ;; --folder) FOLDER="$2" ;; --name) NAME="$2" ;;
        --model) MODEL="$2" ;; --pretrained) PRETRAINED="$2" ;; --model-config) MODEL_CONFIG="$2" ;;
        --shots) SHOTS="$2" ;; --seeds) SEEDS="$2" ;; --aug-views) AUG_VIEWS="$2" ;; --out) OUT="$2" ;;
        --device) DEVICE="$2" ;; --train-args) TRAIN_ARGS="$2" ;; --predict) PREDICT="$2" ;; --run) RUN="$2" ;;
        --predict-args) PREDICT_ARGS="$2" ;; --compare-to) COMPARE_TO="$2" ;; --protocol) PROTOCOL="$2" ;;
        --source) SOURCE="$2" ;;
        --select) SELECT="$2" ;;
      esac
      shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case "$DEVICE" in auto|cpu|cuda) ;; *) die "--device must be auto, cpu or cuda, not '$DEVICE'" ;; esac
case "$SELECT" in seed|mean|none) ;; *) die "--select must be seed, mean or none, not '$SELECT'" ;; esac
for p in $PROTOCOL; do
  case "$p" in few-shot|base-to-new|cross-dataset) ;; *) die "--protocol: '$p' is not few-shot, base-to-new or cross-dataset" ;; esac
done
[ -n "${PROTOCOL// /}" ] || die "--protocol needs at least one of few-shot, base-to-new, cross-dataset"
has_protocol() { case " $PROTOCOL " in *" $1 "*) return 0 ;; esac; return 1; }
[ -z "$SOURCE" ] || has_protocol cross-dataset || die "--source goes with --protocol cross-dataset"
[ -z "$DATASETS" ] || [ -z "$FOLDER" ] || die "give --datasets or --folder, not both"
[ -z "$PREDICT" ] || [ -z "$DATASETS$FOLDER" ] || die "--predict classifies with a trained run: drop --datasets/--folder"
[ -n "$PREDICT" ] || [ -z "$RUN$PREDICT_ARGS" ] || die "--run and --predict-args go with --predict DIR"

DEMO=0
if [ -z "$DATASETS" ] && [ -z "$FOLDER" ]; then
  DEMO=1
  DATASETS="FashionMNIST"
  DATA_ROOT="$OUT/data"
  [ -n "$MODEL_CONFIG" ] || MODEL="${MODEL:-cmm-tiny-vit}"
  PRETRAINED="${PRETRAINED:-random}"
fi
# Registered names as typed -> "NAME" (a set to train on) or "NAME PARENT" (test-only, evaluated with PARENT's model)
RESOLVED=()
if [ -z "$FOLDER" ]; then
  LINES="$("$PY" -m data resolve "$DATASETS")" || exit 2
  mapfile -t RESOLVED <<<"$LINES"
fi
TARGET_ARGS=()  # cross-dataset: --transfer-to every dataset trained on but the source
if has_protocol cross-dataset; then
  [ -z "$FOLDER" ] || die "--protocol cross-dataset needs --datasets with a source and other datasets, not --folder"
  NAMES=()
  for line in "${RESOLVED[@]}"; do read -r ds parent <<<"$line"; [ -n "$parent" ] || NAMES+=("$ds"); done
  if [ -z "$SOURCE" ]; then
    SOURCE="${NAMES[0]}"
    case " ${NAMES[*]} " in *" ImageNet "*) SOURCE=ImageNet ;; esac
  fi
  case " ${NAMES[*]} " in *" $SOURCE "*) ;; *) die "--source $SOURCE is not among the datasets (${NAMES[*]})" ;; esac
  [ "${#NAMES[@]}" -ge 2 ] || die "--protocol cross-dataset needs a source and at least one other dataset in --datasets"
fi
[ -n "$MODEL_CONFIG" ] || MODEL="${MODEL:-RN50-quickgelu}"
[ -z "$MODEL_CONFIG" ] || [ -f "$MODEL_CONFIG" ] || die "--model-config $MODEL_CONFIG is not a file"
case "$MODEL" in
  hf-hub:*|local-dir:*) [ -z "$PRETRAINED" ] || die "--model $MODEL brings its own weights; drop --pretrained" ;;
  *) [ -n "$PRETRAINED" ] || die "--pretrained is required with real data: an open_clip tag (needs the internet) or a local weights file, e.g. --pretrained ~/weights/RN50.pt" ;;
esac
if [ -n "$DATASETS" ] && [ "$DEMO" = 0 ]; then
  [ -n "$DATA_ROOT" ] || die "--datasets needs --data-root DIR (python -m data info ${RESOLVED[0]%% *} shows the layout)"
  [ -d "$DATA_ROOT" ] || die "--data-root $DATA_ROOT is not a folder"
fi
if [ "$DEVICE" = cpu ]; then export JAX_PLATFORMS=cpu; fi

banner() {
  cat <<'EOF'
======================================================================================================
PIPELINE CHECK: tiny random-weight CLIP on Fashion-MNIST. These numbers test that the pipeline runs end
to end; they are NOT CLIP accuracy. For real results give real weights and data, e.g.
  ./run_all.sh --datasets benchmarks --data-root ~/data --model RN50-quickgelu --pretrained ~/weights/RN50.pt
======================================================================================================
EOF
}

if [ "$DEMO" = 1 ] && [ -z "$PREDICT" ]; then
  banner
  "$PY" -m data fashion-mnist --out "$DATA_ROOT/fashion-mnist" --train-per-class 32 --val-per-class 8 \
    --test-per-class 50
fi

# A cache folder per (model, weights): a cache never mixes features of two models.
WEIGHTS_TAG="$(basename "$PRETRAINED")"
MODEL_NAME="${MODEL:-$(basename "$MODEL_CONFIG" .json)}"  # extract names a --model-config model after its file
case "$MODEL_NAME" in
  local-dir:*) MODEL_TAG="local-dir_$(basename "${MODEL_NAME#local-dir:}")" ;; *) MODEL_TAG="$MODEL_NAME" ;;
esac
MODEL_TAG="${MODEL_TAG//[\/:]/_}"
CACHE_DIR="$OUT/cache/${MODEL_TAG}${PRETRAINED:+-${WEIGHTS_TAG%.*}}"
mkdir -p "$CACHE_DIR" "$OUT/runs" "$OUT/results"
MODEL_ARGS=(--device "$DEVICE" --aug-views "$AUG_VIEWS")
[ -z "$MODEL" ] || MODEL_ARGS+=(--model "$MODEL")
[ -z "$PRETRAINED" ] || MODEL_ARGS+=(--pretrained "$PRETRAINED")
[ -z "$MODEL_CONFIG" ] || MODEL_ARGS+=(--model-config "$MODEL_CONFIG")
POOL_ARGS=()  # the train images the draws of these seeds at up to the largest K use (all with --encode-all)
# shellcheck disable=SC2086  # SEEDS and SHOTS are word lists on purpose
[ "$ENCODE_ALL" = 1 ] || POOL_ARGS=(--pool-seeds $SEEDS --pool-shots "$(printf '%s\n' $SHOTS | sort -n | tail -1)")

if [ -n "$PREDICT" ]; then  # a folder of new images -> unlabelled cache with the run's classes -> predictions
  [ -d "$PREDICT" ] || die "--predict $PREDICT is not a folder"
  RUN="${RUN:-$OUT/runs/FashionMNIST}"
  [ -f "$RUN/run_config.json" ] || die "--run $RUN holds no trained run; train first (./run_all.sh, or --run DIR)"
  TRAIN_CACHE="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["cache"])' "$RUN/run_config.json")"
  NAME="${NAME:-$(basename "$(cd "$PREDICT" && pwd)")}"
  mkdir -p "$OUT/predict"
  echo "== $NAME: extracting features of the images to classify -> $CACHE_DIR/unlabelled-$NAME.h5"
  "$PY" -m extract run --folder "$PREDICT" --unlabelled --classes-from "$TRAIN_CACHE" --name "$NAME" \
    "${MODEL_ARGS[@]}" --out "$CACHE_DIR/unlabelled-$NAME.h5"
  # shellcheck disable=SC2086  # PREDICT_ARGS is a word list on purpose
  "$PY" -m train_jax predict --run "$RUN" --cache "$CACHE_DIR/unlabelled-$NAME.h5" --out "$OUT/predict/$NAME.csv" \
    --overwrite $PREDICT_ARGS  # the CSV is this script's own output: a rerun replaces it
  exit 0
fi

extract() {  # extract NAME SOURCE_ARGS...: skip a cache that already holds every image (and view) this run needs
  local name="$1"; shift
  local cache="$CACHE_DIR/$name.h5"
  local todo=1  # no cache yet, or a plan that fails: run the extraction (it says why)
  if [ -f "$cache" ]; then  # the plan's to_encode, or "refused: WHY" (e.g. the cache holds other --aug-views)
    todo="$("$PY" -m extract run "$@" "${MODEL_ARGS[@]}" "${POOL_ARGS[@]}" --out "$cache" --dry-run --json |
      "$PY" -c 'import json, sys; p = json.load(sys.stdin)
print("refused: " + p["refused"] if p["refused"] else p["to_encode"])')" || todo=1
  fi
  case "$todo" in refused:*) die "${todo#refused: } (run_all.sh: or another --out)" ;; esac
  if [ "$todo" = 0 ]; then
    echo "== $name: features cached in $cache"
  else
    echo "== $name: extracting features -> $cache"
    "$PY" -m extract run "$@" "${MODEL_ARGS[@]}" "${POOL_ARGS[@]}" --out "$cache"
  fi
}

TRAIN_SETS=()
if [ -n "$FOLDER" ]; then
  NAME="${NAME:-$(basename "$FOLDER")}"
  extract "$NAME" --folder "$FOLDER" --name "$NAME"
  TRAIN_SETS+=("$NAME")
else
  for line in "${RESOLVED[@]}"; do
    read -r ds parent <<<"$line"
    extract "$ds" --dataset "$ds" --data-root "$DATA_ROOT"
    [ -n "$parent" ] || TRAIN_SETS+=("$ds")
  done
fi

METHOD_ARGS=()  # real runs: methods.default_methods(views, real_run=True); the offline check: train_jax's own
if [ "$DEMO" = 0 ]; then
  read -r -a REAL_METHODS <<<"$("$PY" -c 'import sys; from train_jax.methods import default_methods as d
print(*d(int(sys.argv[1]) > 0, real_run=True))' "$AUG_VIEWS")"
  METHOD_ARGS=(--methods "${REAL_METHODS[@]}")  # a --methods in --train-args comes later and wins
fi
train() {  # train DS OUT_DIR ARGS...: python -m train_jax on DS's cache with the common options
  local ds="$1" dir="$2"; shift 2
  # shellcheck disable=SC2086  # TRAIN_ARGS, SHOTS and SEEDS are word lists on purpose
  "$PY" -m train_jax --cache "$CACHE_DIR/$ds.h5" "$@" "${METHOD_ARGS[@]}" --shots $SHOTS --fit-shots --seeds $SEEDS \
    --select "$SELECT" --out "$dir" --compare-to "$COMPARE_TO" $TRAIN_ARGS
  RUN_DIRS+=("$dir")
}

RUN_DIRS=()
for ds in "${TRAIN_SETS[@]}"; do
  EVAL_ARGS=()
  for line in "${RESOLVED[@]}"; do
    read -r s parent <<<"$line"
    [ "$parent" != "$ds" ] || EVAL_ARGS+=(--eval-cache "$CACHE_DIR/$s.h5")
  done
  [ "$ds" = "$SOURCE" ] || ! has_protocol cross-dataset || TARGET_ARGS+=(--transfer-to "$CACHE_DIR/$ds.h5")
  if has_protocol few-shot; then
    echo "== $ds: training and evaluating (shots: $SHOTS; seeds: $SEEDS)"
    train "$ds" "$OUT/runs/$ds" "${EVAL_ARGS[@]}"
  fi
  if has_protocol base-to-new; then
    echo "== $ds: base-to-new, trained on the first half of the classes (shots: $SHOTS; seeds: $SEEDS)"
    train "$ds" "$OUT/runs/base-to-new/$ds" --protocol base-to-new
  fi
done
if has_protocol cross-dataset; then
  echo "== $SOURCE: cross-dataset source, its models scored on $(( ${#TARGET_ARGS[@]} / 2 )) other datasets (shots: $SHOTS; seeds: $SEEDS)"
  EVAL_ARGS=()
  for line in "${RESOLVED[@]}"; do
    read -r s parent <<<"$line"
    [ "$parent" != "$SOURCE" ] || EVAL_ARGS+=(--eval-cache "$CACHE_DIR/$s.h5")
  done
  train "$SOURCE" "$OUT/runs/cross-dataset/$SOURCE" "${EVAL_ARGS[@]}" "${TARGET_ARGS[@]}"
fi

"$PY" -m train_jax.report "${RUN_DIRS[@]}" --out "$OUT/results" --compare-to "$COMPARE_TO"
echo
cat "$OUT/results/summary.md"
echo
echo "Results: $OUT/results/ (summary.md, summary.json, accuracy_vs_shots.png); per-dataset runs: $OUT/runs/"
if [ "$DEMO" = 1 ]; then banner; fi
