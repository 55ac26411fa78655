"""Benchmark: requests/s of pretrain's lm-eval backend vs lm-eval's own `hf` backend.

The same model (CHECKPOINT, exported with `pretrain export-hf` into a temporary folder for `hf`),
the same tasks and examples, the same batch size, on the same device; the two backends
alternate for --rounds rounds (ours, hf, ours, hf, ...), so that machine noise hits both, and
each round runs lm-eval's whole evaluation (request building, scoring, metrics). Reported:
requests/s per backend (median over rounds) and the ratio ours / hf, and whether the task
scores agree.

Tasks: the embedded pystdlib_next_line (multiple choice: loglikelihood requests) and a
loglikelihood_rolling task over the same items' contexts written as documents.

Run: python benchmarks/eval_throughput.py CHECKPOINT [--limit 200] [--batch-size 16] [--rounds 3]
     [--device cpu|cuda] [--dtype float32|bfloat16]
(default CHECKPOINT: the quickstart's runs/tiny, its newest checkpoint)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from pretrain.eval.backend import PretrainLM
from pretrain.eval.harness import EMBEDDED_DATA, NEXT_LINE, embedded_task, scores
from pretrain.model.checkpoint import load_model_checkpoint
from pretrain.model.hf import save_hf
from pretrain.run_dir import RunDir


def rolling_task(folder: Path) -> dict:
    """The embedded items' contexts (+ true line) as documents, scored with loglikelihood_rolling."""
    path = folder / "rolling.jsonl"
    with open(EMBEDDED_DATA / f"{NEXT_LINE}.jsonl") as items, open(path, "w") as out:
        for line in items:
            item = json.loads(line)
            out.write(json.dumps({"text": item["context"] + item["choices"][item["label"]]}) + "\n")
    return {
        "task": "pystdlib_rolling",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}
        ],
        "metadata": {"version": 1.0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", nargs="?", help="default: the newest checkpoint of runs/tiny")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    checkpoint = args.checkpoint or RunDir("runs/tiny").latest_checkpoint()
    if checkpoint is None:
        raise SystemExit("no CHECKPOINT given and runs/tiny has none (run the quickstart first)")
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model_checkpoint(checkpoint)
        meta = loaded.meta
        save_hf(
            Path(tmp) / "hf",
            loaded.state_dict,
            loaded.config,
            loaded.tokenizer_json,
            meta.get("bos_id"),
            meta.get("eos_id"),
        )
        backends = {
            "pretrain": PretrainLM(
                str(checkpoint), device=args.device, dtype=args.dtype, batch_size=args.batch_size
            ),
            "hf": HFLM(
                pretrained=str(Path(tmp) / "hf"),
                device=args.device,
                batch_size=args.batch_size,
                dtype=args.dtype,
            ),
        }
        specs = [embedded_task(NEXT_LINE), rolling_task(Path(tmp))]
        manager = TaskManager()
        rates: dict[str, list[float]] = {name: [] for name in backends}
        results: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for name, lm in backends.items():
                tasks = manager.load(specs)
                start = time.perf_counter()
                out = evaluator.evaluate(lm, tasks, limit=args.limit, log_samples=False, bootstrap_iters=0)
                elapsed = time.perf_counter() - start
                requests = sum(len(task.instances) for task in tasks["tasks"].values())
                rates[name].append(requests / elapsed)
                results[name] = scores(out)
                print(
                    f"round {round_ + 1} {name:9s} {requests} requests in {elapsed:6.2f} s: {requests / elapsed:8.1f} requests/s"
                )
    ours, theirs = statistics.median(rates["pretrain"]), statistics.median(rates["hf"])
    print(
        f"\ncheckpoint {checkpoint}, {loaded.config.n_layers} layers, dim {loaded.config.dim}, device {args.device}, {args.dtype}, batch {args.batch_size}"
    )
    print(f"pretrain backend  {ours:8.1f} requests/s (median of {args.rounds})")
    print(f"lm-eval hf        {theirs:8.1f} requests/s")
    print(f"ratio             {ours / theirs:8.2f}x")
    same = all(
        abs(results["pretrain"][task][metric] - results["hf"][task][metric]) < 1e-4
        for task in results["hf"]
        for metric in results["hf"][task]
    )
    print(f"scores agree      {same}: {results['pretrain']}")


if __name__ == "__main__":
    main()
