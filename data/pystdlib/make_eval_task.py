"""Build the embedded downstream-evaluation task `pystdlib_next_line` from held-out stdlib files.

"Given the preceding lines of a standard-library file, which of four candidate lines really comes
next?" Every item comes from a *validation* document of the prepared pystdlib dataset (the split
of `pretrain.data.prepare.worker.is_val` with the manifest's `settings.val_fraction`), so a model trained
on the train split never saw the file. Nothing is downloaded.

Construction (deterministic: the same corpus, manifest, --items and --seed give a byte-identical
file; the only other dependency is the running Python's `tokenize` module):

1. Validation documents are taken in corpus order. Each is tokenized with `tokenize`; a document
   it cannot tokenize is skipped (reported).
2. A line is a *candidate* (as target or distractor) if it starts with a code token (a name,
   number or operator; or a string that is followed by more code on the same line, such as
   `"key": value,`): this leaves out comments, docstrings and other lines inside multi-line
   strings. Its stripped text must be 12 to 160 characters long and contain a letter or digit
   (no blank lines, lone `)` / `]`, `else:`, `pass`), and it must have no trailing whitespace.
3. A candidate at line n >= 4 is a usable *target* if its context -- the up to 8 preceding lines,
   dropping the farthest ones until the context is at most 600 characters -- still holds at
   least 3 lines, and the file has at least 3 other candidates with exactly the same indentation,
   distinct stripped text (distinct from the target and from each other) and not occurring in
   the context. Distractors share the target's indentation so that indentation alone never gives
   the answer away (positions without enough are skipped rather than padded with other
   indentations); a line already in the context is never a distractor, since code often repeats
   a line (tests, imports), which would make the item ambiguous, or trivial to rule out.
4. Items are spread across files: each document's usable positions are shuffled (seeded by
   --seed and the file path) and items are taken round-robin, one per document per round (the
   order within a round is a seeded shuffle of the documents), so each file contributes at most
   one more item than any file with positions left. Output is sorted by corpus order and line.
5. Each item draws its 3 distractors and shuffles its 4 choices with its own RNG, seeded by
   --seed, path and line: an item does not change when --items changes.

Each output line: {"context": str, "choices": [4 str], "label": int, "path": str, "line": int}
-- `context` is the preceding lines joined with "\\n" and ending with "\\n"; choices are whole
lines with their indentation and without a newline; `label` is the index of the true line;
`path` is stdlib-relative; `line` is the target's 1-based line number. The file is written
atomically (temporary file beside it, then `os.replace`).

Run: python data/pystdlib/make_eval_task.py [--corpus F] [--manifest F] [--out F] [--items N] [--seed S]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pretrain.data.prepare.worker import is_val
from pretrain.files import write_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

MIN_CHARS, MAX_CHARS = 12, 160  # stripped length of a candidate line
CONTEXT_LINES, CONTEXT_CHARS, MIN_CONTEXT_LINES = 8, 600, 3
N_CHOICES = 4
SKIP_TOKENS = {tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER}
CODE_TOKENS = {tokenize.NAME, tokenize.NUMBER, tokenize.OP}


@dataclass
class Doc:
    index: int  # position in the corpus
    path: str
    lines: list[str]
    positions: list[int]  # 0-based indices of usable targets, in seeded random order
    pools: dict[str, list[str]]  # indentation -> distinct candidate lines, in file order


def code_lines(text: str) -> set[int]:
    """0-based indices of lines that begin with a code token (not a comment or string interior)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    first: dict[int, int] = {}  # row -> index of the first real token starting on it
    for i, tok in enumerate(tokens):
        if tok.type not in SKIP_TOKENS:
            first.setdefault(tok.start[0], i)
    lines = text.split("\n")
    code = set()
    for row, i in first.items():
        tok, line = tokens[i], lines[row - 1]
        if tok.start[1] != len(line) - len(line.lstrip()):
            continue  # the line begins inside a token that started earlier (a multi-line string)
        if tok.type in CODE_TOKENS:
            code.add(row - 1)
        elif tok.type == tokenize.STRING and tok.end[0] == row:
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if following is not None and following.start[0] == row and following.type in CODE_TOKENS:
                code.add(row - 1)  # e.g. `"key": value,` -- not a lone docstring
    return code


def is_candidate(line: str) -> bool:
    stripped = line.strip()
    return (
        MIN_CHARS <= len(stripped) <= MAX_CHARS
        and line == line.rstrip()
        and any(c.isalnum() for c in stripped)
    )


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def context_of(lines: list[str], n: int) -> str | None:
    """The up to CONTEXT_LINES lines before line n, cut to CONTEXT_CHARS at a line boundary."""
    window = lines[max(0, n - CONTEXT_LINES) : n]
    while window and sum(len(x) + 1 for x in window) > CONTEXT_CHARS:
        window = window[1:]
    if len(window) < MIN_CONTEXT_LINES:
        return None
    return "".join(x + "\n" for x in window)


def distractors(lines: list[str], pools: dict[str, list[str]], n: int) -> list[str]:
    """Lines that may stand in for line n: same indentation, not the target, not in its context."""
    context = set((context_of(lines, n) or "").split("\n"))
    return [x for x in pools[indentation(lines[n])] if x != lines[n] and x not in context]


def analyse(index: int, path: str, text: str, seed: int) -> Doc | None:
    """A document's candidate pools and usable target positions; None if it cannot be tokenized."""
    try:
        code = code_lines(text)
    except (tokenize.TokenError, SyntaxError):
        return None
    lines = text.split("\n")
    candidates = [n for n in sorted(code) if is_candidate(lines[n])]
    pools: dict[str, list[str]] = {}
    for n in candidates:
        pool = pools.setdefault(indentation(lines[n]), [])
        if lines[n] not in pool:  # same indentation and no trailing space: distinct lines = distinct strips
            pool.append(lines[n])
    positions = [
        n
        for n in candidates
        if n >= MIN_CONTEXT_LINES
        and context_of(lines, n) is not None
        and len(distractors(lines, pools, n)) >= N_CHOICES - 1
    ]
    random.Random(f"{seed}:{path}").shuffle(positions)
    return Doc(index, path, lines, positions, pools)


def make_item(doc: Doc, n: int, seed: int) -> dict:
    rng = random.Random(f"{seed}:{doc.path}:{n + 1}")
    target = doc.lines[n]
    choices = [target, *rng.sample(distractors(doc.lines, doc.pools, n), N_CHOICES - 1)]
    rng.shuffle(choices)
    return {
        "context": context_of(doc.lines, n),
        "choices": choices,
        "label": choices.index(target),
        "path": doc.path,
        "line": n + 1,
    }


def read_corpus(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def select(docs: list[Doc], items: int, seed: int) -> list[tuple[Doc, int]]:
    """Round-robin over documents (seeded order within a round) until `items` positions are taken."""
    order = list(docs)
    random.Random(f"{seed}:documents").shuffle(order)
    chosen: list[tuple[Doc, int]] = []
    for r in range(max((len(d.positions) for d in docs), default=0)):
        for doc in order:
            if len(chosen) == items:
                return chosen
            if r < len(doc.positions):
                chosen.append((doc, doc.positions[r]))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=HERE / "out-raw" / "corpus.jsonl",
                        help="raw corpus, one {text, path} per line (default: %(default)s)")  # fmt: skip
    parser.add_argument("--manifest", type=Path, default=HERE / "out" / "manifest.json",
                        help="dataset manifest giving settings.val_fraction (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "pretrain" / "eval" / "tasks" / "pystdlib_next_line.jsonl",
                        help="output jsonl (default: %(default)s)")  # fmt: skip
    parser.add_argument("--items", type=int, default=500, help="number of items (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default: %(default)s)")
    args = parser.parse_args()

    manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
    val_fraction = float(manifest["settings"]["val_fraction"])
    text_field = manifest["settings"].get("text_field", "text")

    docs, n_val, untokenizable = [], 0, []
    for index, record in enumerate(read_corpus(args.corpus)):
        text = record[text_field]
        if not is_val(text, val_fraction):
            continue
        n_val += 1
        doc = analyse(index, record["path"], text, args.seed)
        if doc is None:
            untokenizable.append(record["path"])
        elif doc.positions:
            docs.append(doc)

    expected = manifest.get("splits", {}).get("val", {}).get("documents")
    if expected is not None and expected != n_val:
        print(f"warning: {n_val} validation documents in {args.corpus}, the manifest says {expected}")
    chosen = select(docs, args.items, args.seed)
    if len(chosen) < args.items:
        print(f"warning: only {len(chosen)} usable positions for {args.items} items")
    chosen.sort(key=lambda c: (c[0].index, c[1]))
    records = [make_item(doc, n, args.seed) for doc, n in chosen]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomic(args.out, data.encode("utf-8"))

    used = {doc.path for doc, _ in chosen}
    per_file = [sum(1 for d, _ in chosen if d.path == p) for p in used]
    labels = [sum(1 for r in records if r["label"] == k) for k in range(N_CHOICES)]
    print(f"validation documents: {n_val} (val_fraction {val_fraction}); untokenizable: {len(untokenizable)}"
          + (f" ({', '.join(untokenizable)})" if untokenizable else ""))  # fmt: skip
    print(f"items: {len(records)} from {len(used)} documents (at most {max(per_file, default=0)} per file); "
          f"labels {labels} -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
