#!/usr/bin/env bash
# One command from a fresh clone to a trained tiny model: set up .venv, prepare the embedded
# pystdlib corpus, train the `tiny` preset on CPU for a few minutes (validation loss printed as
# it falls), plot the loss curves, and export the final checkpoint to Hugging Face format.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
RUN_DIR=${RUN_DIR:-runs/tiny}

echo "== 1/4 preparing the pystdlib corpus (tokenizer + token shards) =="
python data/pystdlib/prepare.py
echo "== 2/4 training the tiny preset on CPU =="
pretrain fit --config configs/tiny.yaml --run_dir "$RUN_DIR" "$@"
echo "== 3/4 plotting loss curves =="
pretrain plot "$RUN_DIR" -o "$RUN_DIR/loss.png"
echo "== 4/4 exporting the last checkpoint to Hugging Face format =="
LAST=$(ls -d "$RUN_DIR"/checkpoints/step-*.ckpt | sort | tail -n 1)
pretrain export-hf "$LAST" "$RUN_DIR/hf"

cat <<DONE

Done. Everything is under $RUN_DIR:
  checkpoints   $RUN_DIR/checkpoints/   (resume: run the same pretrain fit command again)
  logs          $RUN_DIR/logs/version_*/metrics.csv
  loss curves   $RUN_DIR/loss.png
  HF model      $RUN_DIR/hf/   (transformers.LlamaForCausalLM.from_pretrained("$RUN_DIR/hf"))
DONE
