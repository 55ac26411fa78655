#!/usr/bin/env bash
# One command from a fresh clone to a trained tiny model: set up .venv, prepare the embedded
# pystdlib corpus, train the `tiny` preset on CPU for a few minutes (validation loss and the
# embedded downstream task's accuracy printed as they improve), plot the curves, export the final
# checkpoint to Hugging Face format, and score the checkpoints on the downstream task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
RUN_DIR=${RUN_DIR:-runs/tiny}

echo "== 1/5 preparing the pystdlib corpus (tokenizer + token shards) =="
python data/pystdlib/prepare.py
echo "== 2/5 training the tiny preset on CPU (+ the pystdlib_next_line benchmark every 30 steps) =="
pretrain fit --config configs/tiny.yaml --run_dir "$RUN_DIR" \
    --trainer.callbacks+=pretrain.train.callbacks.downstream.DownstreamEval \
    --trainer.callbacks.tasks='[pystdlib_next_line]' --trainer.callbacks.every_n_steps=30 \
    --trainer.callbacks.limit=200 "$@"
echo "== 3/5 plotting loss and benchmark curves =="
pretrain plot "$RUN_DIR" -o "$RUN_DIR/loss.png"
echo "== 4/5 exporting the last checkpoint to Hugging Face format =="
LAST=$(ls -d "$RUN_DIR"/checkpoints/step-*.ckpt | sort | tail -n 1)
pretrain export-hf "$LAST" "$RUN_DIR/hf"
echo "== 5/5 downstream score of the kept checkpoints (all 500 pystdlib_next_line items) =="
pretrain eval "$RUN_DIR" --tasks pystdlib_next_line

cat <<DONE

Done. Everything is under $RUN_DIR:
  checkpoints   $RUN_DIR/checkpoints/   (resume: run the same pretrain fit command again)
  logs          $RUN_DIR/logs/version_*/metrics.csv
  curves        $RUN_DIR/loss.png   (loss, learning rate, pystdlib_next_line accuracy)
  benchmarks    $RUN_DIR/eval/table.md   (pretrain eval RUN_DIR --tasks ...)
  HF model      $RUN_DIR/hf/   (transformers.LlamaForCausalLM.from_pretrained("$RUN_DIR/hf"))
DONE
