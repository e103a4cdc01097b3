#!/usr/bin/env bash
# Everything the GPU machine is needed for, in one device call (a session has about 15 minutes of it), in the order
# that matters if time runs out:
#   1. the original recipe's trial (../shared/bench/seed_recipe_gpu.py, the baseline, 8B shape)
#   2. tuner's scorer against the one-row loop (bench/score.py)
#   3. tuner's single trial with sized steps and co-training K = 4, 8, 16 (bench/cotrain.py)
#   4. a real `tuner run` on CUDA with the 8B recipe's settings, the study in SQLite
# `bench/gpu.sh bench` runs 1-3 only, `bench/gpu.sh e2e` 4 only (on a warm machine that already has the model).
# PARTS picks steps; the default, seed,cotrain,e2e, leaves out the scorer (its target is met and measured:
# PARTS=seed,score,cotrain,e2e runs everything).
# The carried transformers and peft are the versions pyproject pins (the machine's own transformers is older).
# Needs, carried into the checkout (both in .git/info/exclude; 36 MB together, the limit is 64 MiB):
#   .whl/  cp312 manylinux wheels, fetched with `pip download --no-deps --only-binary=:all: --python-version 3.12
#          --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl ...`:
#          bitsandbytes==0.50.2 trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 optuna==5.0.0 alembic
#          Mako colorlog sqlalchemy==2.1.9 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
#          typing_extensions transformers==5.24.0 peft==0.21.2. The bitsandbytes wheel (42 MB) is slimmed to its
#          CPU and CUDA 13 libraries (the machine's torch is cu130): unzip, delete libbitsandbytes_cuda1[12]*.so and
#          *_rocm*.so, drop their lines from the dist-info RECORD, zip again under the same name.
#   .gpu/bench/  a copy of ../shared/bench: the seed script, its data and tokenizer.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
SHAPE=${SHAPE:-8b}
DEVICE=${DEVICE:-cuda}
if [ -z "${SKIP_INSTALL:-}" ] && [ ! -d /tmp/site/trl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TUNER_BENCH_TOKENIZER=$PWD/.gpu/bench/tok TUNER_BENCH_DATA=$PWD/.gpu/bench/data TUNER_CACHE=/tmp/tuner-cache
log() { echo "== $(date +%T) $*" | tee -a "$OUT/timeline.txt"; }

MODE=${1:-all}
PARTS=${PARTS:-seed,cotrain,e2e}
want() { [[ ",$PARTS," == *",$1,"* ]]; }
if [ "$MODE" != "e2e" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/timeline.txt" || true
  python3 -c "import torch, transformers, peft, trl, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, trl.__version__, bitsandbytes.__version__)" | tee -a "$OUT/timeline.txt"
  want seed && log "seed recipe $SHAPE"
  # --no-score: bench/score.py runs the recipe's one-row scoring loop itself, on the same model
  want seed && timeout "${SEED_S:-160}" python3 .gpu/bench/seed_recipe_gpu.py --plan "$SHAPE:seed4" --steps 25 --no-score > "$OUT/seed.log" 2>&1
  want seed && { log "seed done ($?)"; tail -5 "$OUT/seed.log"; }
  want score && log "tuner scorer"
  want score && timeout "${SCORE_S:-130}" python3 bench/score.py --model "random:$SHAPE" --device "$DEVICE" \
    --batch "${SCORE_BATCH:-256}" --rows "${SCORE_ROWS:-768}" --one-row-rows 24 > "$OUT/score.log" 2>&1
  want score && { log "score done ($?)"; tail -3 "$OUT/score.log"; }
  want cotrain && log "tuner training: single sized + co-training"
  want cotrain && timeout "${COTRAIN_S:-150}" python3 bench/cotrain.py --model "random:$SHAPE" --device "$DEVICE" --ks "${KS:-4,8,16}" \
    --steps 8 --warmup 3 --profile-k "${PROFILE_K:-16}" --recipe-from "$OUT/results.jsonl" --shape "$SHAPE" > "$OUT/cotrain.log" 2>&1
  want cotrain && { log "cotrain done ($?)"; tail -3 "$OUT/cotrain.log"; }
fi
if [ "$MODE" != "bench" ] && want e2e; then
  log "tuner run on CUDA"
  python3 - <<'PY'
import os, yaml
cfg = yaml.safe_load(open("sweeps/pricer-llama31-8b.yaml"))
cfg["study"].update(name="gpu-e2e", trials=2, output_dir="/tmp/gpu-runs")
cfg["model"] = {"name": "/tmp/model_" + os.environ.get("SHAPE", "8b")}
cfg["study"]["sampler"] = {"type": "grid", "seed": 0}
cfg["search"]["learning_rate"] = {"choices": [1.0e-4, 3.0e-4]}
cfg["data"] = {"source": os.environ["TUNER_BENCH_DATA"] + "/train.jsonl", "text_column": "prompt",
               "price_column": "price", "train_rows": 160, "val_rows": 32, "test_rows": 128, "seed": 0}
cfg["train"]["checkpoint_every"] = 20
cfg["scoring"]["batch_size"] = 128
cfg["tracking"] = {"wandb": {"mode": "disabled"}}
yaml.safe_dump(cfg, open("/tmp/gpu-e2e.yaml", "w"))
PY
  rm -rf /tmp/gpu-e2e.db* /tmp/gpu-runs
  timeout "${E2E_S:-140}" python3 -m tuner.cli run /tmp/gpu-e2e.yaml --storage sqlite:////tmp/gpu-e2e.db --device "$DEVICE" \
    > "$OUT/e2e.log" 2>&1
  log "e2e done ($?)"; tail -15 "$OUT/e2e.log"
  python3 -m tuner.cli best gpu-e2e --storage sqlite:////tmp/gpu-e2e.db >> "$OUT/e2e.log" 2>&1
  python3 -m tuner.cli status gpu-e2e --storage sqlite:////tmp/gpu-e2e.db >> "$OUT/e2e.log" 2>&1
  grep -E "execution|rows_per_s|mae|device|quantization|cuda_peak" "$OUT/e2e.log" | tail -20
fi
