"""The shipped `pystdlib_next_line` evaluation task and its builder, data/pystdlib/make_eval_task.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "pystdlib" / "make_eval_task.py"
SHIPPED = ROOT / "pretrain" / "eval" / "tasks" / "pystdlib_next_line.jsonl"


def read_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_item(item: dict) -> None:
    assert set(item) == {"context", "choices", "label", "path", "line"}
    choices = item["choices"]
    assert len(choices) == 4 and len({c.strip() for c in choices}) == 4, choices
    assert all(isinstance(c, str) and "\n" not in c for c in choices)
    assert isinstance(item["label"], int) and 0 <= item["label"] < 4
    assert item["context"].endswith("\n") and item["context"].count("\n") >= 3
    assert isinstance(item["line"], int) and item["line"] >= 4
    target = choices[item["label"]]
    assert len({c[: len(c) - len(c.lstrip())] for c in choices}) == 1, "indentation gives it away"
    assert not target.lstrip().startswith("#")


def test_shipped_items_are_well_formed():
    items = read_items(SHIPPED)
    assert len(items) == 500
    for item in items:
        check_item(item)
    assert len({(i["path"], i["line"]) for i in items}) == len(items)
    assert SHIPPED.stat().st_size < 1_000_000


def test_shipped_labels_are_balanced():
    items = read_items(SHIPPED)
    counts = Counter(item["label"] for item in items)
    for k in range(4):
        assert 0.15 <= counts[k] / len(items) <= 0.35, counts


def fake_module(k: int) -> str:
    lines = [f'"""Fake module number {k}, with a docstring long enough to be a candidate line."""', ""]
    lines += ["import os", "import sys", ""]
    for f in range(5):
        lines += [f"def function_{k}_{f}(argument, other=None):", f'    """Docstring of function {f}.', "", f"    More words about the function number {f}.", '    """']  # fmt: skip
        lines += ["    # a comment line that is long enough to pass the length filter"]
        lines += [f"    value_{j} = argument * {j + f} + other_{k}({j})" for j in range(6)]
        lines += [f"    if value_{f} > {k}:", f"        return value_{f} - {f + k}", "    else:", "        return None", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def build(tmp: Path, out: Path) -> str:
    corpus = tmp / "corpus.jsonl"
    docs = [{"text": fake_module(k), "path": f"pkg/mod_{k}.py"} for k in range(5)]
    docs.append({"text": 'x = """never closed\n', "path": "broken.py"})  # cannot be tokenized
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    manifest = tmp / "manifest.json"
    manifest.write_text(json.dumps({"settings": {"val_fraction": 1.0}}), encoding="utf-8")
    args = ["--corpus", corpus, "--manifest", manifest, "--out", out, "--items", "40", "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_builder_is_deterministic_on_a_synthetic_corpus(tmp_path):
    first, second = tmp_path / "a" / "task.jsonl", tmp_path / "b" / "task.jsonl"
    stdout = build(tmp_path, first)
    build(tmp_path, second)
    assert first.read_bytes() == second.read_bytes()
    assert "validation documents: 6" in stdout and "untokenizable: 1" in stdout
    items = read_items(first)
    assert len(items) == 40
    assert not list(first.parent.glob("*.tmp"))
    sources = {f"pkg/mod_{k}.py": fake_module(k).split("\n") for k in range(5)}
    for item in items:
        check_item(item)
        lines = sources[item["path"]]
        n = item["line"] - 1
        assert item["choices"][item["label"]] == lines[n]
        assert item["context"] == "".join(x + "\n" for x in lines[max(0, n - 8) : n])
        for choice in item["choices"]:
            assert choice in lines and not any(
                w in choice for w in ("Docstring", "More words", "Fake", "# a")
            )
    assert len({item["label"] for item in items}) > 1
    assert max(Counter(item["path"] for item in items).values()) == 8  # spread evenly over 5 files
