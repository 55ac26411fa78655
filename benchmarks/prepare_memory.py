"""Benchmark: peak memory of `pretrain data prepare` on one huge document vs on a small input.

The input is the Python standard library's source (a few MB, `BASE`) repeated into one document:
a .txt file of --gigabytes (one document per text file) and a single-line .jsonl of
--jsonl-gigabytes. Each is prepared by the real command (`python -m pretrain.cli data prepare
--num-proc 2`) in a subprocess, and so is `BASE` alone (the small input). Memory is measured two
ways: the largest resident set of any one process of the command (`os.wait4`'s ru_maxrss, which
covers the workers the command reaps: exact, but per process), and the sum over the command's
process tree, sampled every 20 ms from /proc (catches the sum, may miss a short peak).

The shards are checked token for token against the document tokenized without `prepare`:
`BASE` ends with a line break and starts a line, a pre-tokenization boundary, so the document's
ids are `BASE`'s ids repeated (checked on three copies first), then EOS.

Target (issue 21, item 4): the 1 GB document peaks at most 1 GB above the small input.

Run: python benchmarks/prepare_memory.py [--work DIR] [--gigabytes 1] [--jsonl-gigabytes 1]

Measured (2 shared CPU cores, 24 GB RAM; 4096-token BPE; `--num-proc 2`; each pair of rows from one run):

    input                     size     time  largest process  whole tree
    small input            0.002 GB     1.0 s         0.231 GB    0.325 GB
    one txt document       1.000 GB   457.7 s         0.290 GB    0.382 GB

    small input            0.002 GB     1.1 s         0.231 GB    0.316 GB
    one jsonl document     1.036 GB   724.2 s         0.298 GB    0.390 GB

The 1 GB text document peaks 0.059 GB above the small input, the 1 GB single-line JSON document
+0.066 GB (largest process) / +0.074 GB (whole tree); target: at most +1 GB. Both shards are identical
token for token. The JSON line is parsed as it is read (`pretrain.data.prepare.inputs.LongLine`): its text
is decoded, hashed and tokenized a block at a time (before: a 0.258 GB line peaked at 1.564 GB, the
line held as bytes, decoded line and parsed string). The JSON run shared the 2 cores with other
work (load about 5), so its time is not comparable with the text run's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE_FILES = 60  # stdlib modules in BASE


def base_text() -> str:
    """A few MB of real text that starts a line and ends with a line break."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:BASE_FILES]
    text = "".join(Path(p).read_text(errors="replace").replace("\r", "").strip() + "\n" for p in files)
    return "x = 0\n" + text  # ends "<non-space>\n", starts "x": the same split at a seam as at the ends


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(args: list[str]) -> tuple[float, int, int]:
    """(seconds, largest process peak RSS, sampled peak of the tree's sum) of `pretrain ARGS`, measured
    from a fresh small process (`--measure`): a child's ru_maxrss starts at its parent's size."""
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(args)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    seconds, largest, summed = json.loads(out.strip().splitlines()[-1])
    return seconds, largest, summed


def measured(args: list[str]) -> tuple[float, int, int]:
    """`measure`'s figures, in this process (which must be small: stdlib only)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", *args], env=env, stdout=subprocess.DEVNULL)
    summed = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        summed = max(summed, tree_rss(proc.pid))
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, f"pretrain {' '.join(args)} failed ({proc.returncode})"
    return time.perf_counter() - began, usage.ru_maxrss * 1024, summed


def check_tokens(dataset: Path, base_ids: np.ndarray, copies: int, eos: int) -> None:
    """The dataset holds one document: `base_ids` repeated `copies` times, then EOS."""
    import numpy as np

    from pretrain.data.shards import load_manifest

    manifest = load_manifest(dataset)
    (shard,) = manifest.shards("train")
    assert manifest.shards("val") == [] and shard.tokens == len(base_ids) * copies + 1
    tokens = np.memmap(shard.path, dtype=manifest.dtype, mode="r")
    n = len(base_ids)
    for copy in range(copies):
        assert np.array_equal(tokens[copy * n : (copy + 1) * n], base_ids), f"copy {copy} differs"
    assert tokens[-1] == eos


def prepare_args(source: Path, tokenizer: Path, out: Path) -> list[str]:
    return ["data", "prepare", "--input", str(source), "--tokenizer", str(tokenizer), "--output", str(out),
            "--num-proc", "2", "--val-fraction", "0", "--overwrite"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "pretrain-bench-prepare-memory"
    )
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--jsonl-gigabytes", type=float, default=1.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one command (JSON args)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measured(json.loads(args.measure))))
        return
    import numpy as np

    from pretrain.data.tokenizer import load_tokenizer, train_bpe

    args.work.mkdir(parents=True, exist_ok=True)
    base = base_text()
    tokenizer = args.work / "tokenizer.json"
    train_bpe([base], vocab_size=4096).save(str(tokenizer))
    tok = load_tokenizer(tokenizer)
    base_ids = np.array(tok.tokenizer.encode(base, add_special_tokens=False).ids, dtype=np.uint16)
    thrice = tok.tokenizer.encode(base * 3, add_special_tokens=False).ids
    assert np.array_equal(np.array(thrice, dtype=np.uint16), np.tile(base_ids, 3)), "BASE is not a boundary"
    data = base.encode()
    print(f"BASE: {len(data) / 1e6:.1f} MB, {len(base_ids):,} tokens")

    small = args.work / "small.txt"
    small.write_bytes(data)
    results = {"small input": (measure(prepare_args(small, tokenizer, args.work / "out-small")), len(data))}
    check_tokens(args.work / "out-small", base_ids, 1, tok.eos_id)
    for kind, gigabytes in (("txt", args.gigabytes), ("jsonl", args.jsonl_gigabytes)):
        if gigabytes <= 0:
            continue
        copies = max(1, round(gigabytes * 1e9 / len(data)))
        source = args.work / f"one-document.{kind}"
        with open(source, "wb") as f:
            if kind == "jsonl":
                f.write(b'{"text": "')
                f.write(json.dumps(base)[1:-1].encode() * copies)
                f.write(b'"}\n')
            else:
                for _ in range(copies):
                    f.write(data)
        out = args.work / f"out-{kind}"
        results[f"one {kind} document"] = (
            measure(prepare_args(source, tokenizer, out)),
            source.stat().st_size,
        )
        check_tokens(out, base_ids, copies, tok.eos_id)
        source.unlink()
        shutil.rmtree(out)
    print(f"{'input':<20} {'size':>9} {'time':>8} {'largest process':>16} {'whole tree':>11}")
    for name, ((seconds, largest, summed), size) in results.items():
        print(
            f"{name:<20} {size / 1e9:7.3f} GB {seconds:7.1f} s {largest / 1e9:13.3f} GB {summed / 1e9:8.3f} GB"
        )
    (_, small_largest, small_summed), _ = results["small input"]
    for kind in ("txt", "jsonl"):
        if f"one {kind} document" in results:
            (_, largest, summed), size = results[f"one {kind} document"]
            print(f"one {size / 1e9:.2f} GB {kind} document: +{(largest - small_largest) / 1e9:.3f} GB (largest "
                  f"process), +{(summed - small_summed) / 1e9:.3f} GB (whole tree) over the small input; "
                  "target <= +1 GB")  # fmt: skip
    print("shards identical to the document tokenized without prepare: yes")


if __name__ == "__main__":
    main()
