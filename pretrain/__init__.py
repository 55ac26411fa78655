"""pretrain: pretrain and continually pretrain small Llama-architecture language models.

Packages: `model` (the Llama, the one module that opens weights), `data` (the shard reading
path; `data.prepare`, raw text -> shards), `train` (`pretrain fit`, `train.callbacks`), `eval`
(lm-evaluation-harness), `run_dir` (the one owner of RUN_DIR), `slurm` (submit, status),
`commands` (one module per subcommand, `cli` their entry point). At the bottom, read by all and
reading none of them: `recipe` (the recipe, its defaults and batch geometry), `files` (atomic
writes), `errors`, `lease`, `progress`. `plot` draws runs' curves. Imports run one way:
commands -> train -> data/model/run_dir -> recipe/files (tests/test_structure.py).
"""

__version__ = "0.1.0"
