"""Downstream evaluation: our lm-eval backend against lm-eval's own `hf` backend on the export,
`pretrain eval` on a checkpoint and a run, offline failures, the embedded task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import require

from pretrain.cli import main
from pretrain.model import Llama, LlamaConfig
from pretrain.model.checkpoint import ModelCheckpoint, save_model_checkpoint

lm_eval = require("lm_eval")
require("transformers")

CONFIG = LlamaConfig(
    vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128, max_seq_len=128
)


@pytest.fixture(scope="module")
def model_and_export(tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny model with the tiny dataset's tokenizer (no BOS: documents follow EOS), as a
    model file and as its `export-hf` directory."""
    root = tmp_path_factory.mktemp("eval_model")
    torch.manual_seed(0)
    model = Llama(CONFIG)
    tokenizer = (tiny_dataset / "tokenizer.json").read_text()
    meta = {"eos_id": 0, "bos_id": None, "tokens_seen": 12345}
    path = save_model_checkpoint(
        root / "model.pt", ModelCheckpoint(CONFIG, model.state_dict(), tokenizer, meta)
    )
    assert main(["export-hf", str(path), str(root / "hf")]) == 0
    return path, root / "hf"


@pytest.fixture(scope="module")
def rolling_task(tmp_path_factory) -> dict:
    """A local loglikelihood_rolling task: documents longer than the 128-token context (several windows)."""
    import sysconfig

    root = tmp_path_factory.mktemp("rolling")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(root / "docs.jsonl", "w") as f:
        for name in ("this.py", "abc.py", "bisect.py", "colorsys.py"):
            f.write(json.dumps({"text": (stdlib / name).read_text()[:3000]}) + "\n")
    return {
        "task": "local_rolling",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(root / "docs.jsonl")}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0},
    }


def _samples(lm, tasks: dict, limit: int) -> dict:
    """Per task, per document: lm-eval's filtered responses, and the results."""
    from lm_eval import evaluator

    results = evaluator.evaluate(lm, tasks, limit=limit, log_samples=True, bootstrap_iters=0)
    by_task = {
        task: {s["doc_id"]: s["filtered_resps"] for s in samples}
        for task, samples in results["samples"].items()
    }
    return {"responses": by_task, "results": results["results"]}


@pytest.mark.slow
def test_backend_matches_lm_eval_hf_backend_on_the_export(model_and_export, rolling_task):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pretrain.eval.backend import PretrainLM
    from pretrain.eval.harness import embedded_task

    model_file, export = model_and_export
    ours = PretrainLM(str(model_file), batch_size=8)
    theirs = HFLM(pretrained=str(export), device="cpu", batch_size=8, dtype="float32")
    assert ours.prefix_token_id == theirs.prefix_token_id == 0  # EOS: what preceded every document

    def tasks() -> dict:
        return TaskManager().load([embedded_task("pystdlib_next_line"), rolling_task])

    mine, reference = _samples(ours, tasks(), 40), _samples(theirs, tasks(), 40)
    compared = 0
    for task in ("pystdlib_next_line", "local_rolling"):
        assert mine["responses"][task].keys() == reference["responses"][task].keys()
        for doc, responses in mine["responses"][task].items():
            for a, b in zip(responses, reference["responses"][task][doc], strict=True):
                a, b = (
                    (a[0], a[1]) if isinstance(a, list | tuple) else (a, None),
                    ((b[0], b[1]) if isinstance(b, list | tuple) else (b, None)),
                )
                assert a[0] == pytest.approx(b[0], abs=1e-4), (task, doc)
                assert a[1] == b[1], (task, doc)  # is_greedy
                compared += 1
    assert compared >= 40 * 4 + 4
    for metric in ("acc,none", "acc_norm,none"):
        assert (
            mine["results"]["pystdlib_next_line"][metric]
            == reference["results"]["pystdlib_next_line"][metric]
        )


def test_generate_until_is_greedy_pretrain_generate(model_and_export, capsys):
    from lm_eval.api.instance import Instance

    from pretrain.eval.backend import PretrainLM

    model_file, _ = model_and_export
    prompts = ["def main(", "import os\nimport sys\n\n"]
    lm = PretrainLM(str(model_file), batch_size=2)
    requests = [
        Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 24, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]
    completions = lm.generate_until(requests, disable_tqdm=True)
    for prompt, completion in zip(prompts, completions):
        assert (
            main(
                [
                    "generate",
                    str(model_file),
                    "--prompt",
                    prompt,
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "24",
                ]
            )
            == 0
        )
        assert capsys.readouterr().out == prompt + completion.split("<|endoftext|>")[0] + "\n"


@pytest.mark.slow
def test_eval_command_on_a_checkpoint_writes_results_and_table(model_and_export, tmp_path, capsys):
    model_file, _ = model_and_export
    out = tmp_path / "results.json"
    args = ["eval", str(model_file), "--tasks", "pystdlib_next_line", "--limit", "20", "-o", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "pystdlib_next_line (acc_norm)" in table
    results = json.loads(out.read_text())
    assert set(results["results"]["pystdlib_next_line"]) >= {"acc,none", "acc_norm,none"}
    assert out.with_suffix(".md").read_text() == table


@pytest.mark.slow
def test_eval_command_on_a_run_scores_each_checkpoint_once(model_and_export, tmp_path, capsys):
    from pretrain.run_dir import RunDir

    model_file, _ = model_and_export
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    for step in (10, 20, 30):  # model files under checkpoint names: every form is read the same way
        (run.checkpoints / f"step-{step:08d}.ckpt").write_bytes(model_file.read_bytes())
    args = ["eval", str(run.path), "--tasks", "pystdlib_next_line", "--limit", "8", "--every", "10"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.err.count("evaluating step-") == 3
    assert main(args) == 0  # rerun: nothing evaluated again, the same table
    second = capsys.readouterr()
    assert "evaluating" not in second.err and second.out == first.out
    assert [line.split("|")[1].strip() for line in first.out.splitlines()[4:]] == [
        f"step {s} (12.3K tokens)" for s in (10, 20, 30)
    ]
    assert (run.eval_dir / "table.md").read_text() == first.out
    assert json.loads(run.eval_result(20).read_text())["step"] == 20


def test_suite_names_tinyllamas_seven_tasks_and_metrics():
    from pretrain.eval.harness import headline, parse_tasks

    tasks = parse_tasks("tinyllama-commonsense,pystdlib_next_line")
    assert tasks == [
        "hellaswag", "openbookqa", "winogrande", "arc_challenge", "arc_easy", "boolq", "piqa", "pystdlib_next_line"
    ]  # fmt: skip
    assert headline("winogrande", {"acc": 0.5}) == ("acc", 0.5)
    assert headline("piqa", {"acc": 0.6, "acc_norm": 0.7}) == ("acc_norm", 0.7)


@pytest.mark.slow
def test_a_task_whose_dataset_is_missing_fails_at_once_in_one_line(model_and_export, tmp_path, monkeypatch):
    import subprocess

    from helpers import PRETRAIN

    model_file, _ = model_and_export
    env = {
        **__import__("os").environ,
        "HF_HOME": str(tmp_path / "empty-cache"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [PRETRAIN, "eval", str(model_file), "--tasks", "piqa"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "task piqa" in lines[0] and "pretrain eval --download piqa" in lines[0]


@pytest.mark.slow
def test_unknown_task_and_bad_arguments_are_one_line_errors(model_and_export, capsys):
    model_file, _ = model_and_export
    assert main(["eval", str(model_file), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown task 'no_such_task_xyz'" in capsys.readouterr().err
    assert main(["eval", str(model_file), "--tasks", "pystdlib_next_line", "--batch-size", "0"]) == 2
    assert main(["eval", "no/such/path", "--tasks", "pystdlib_next_line"]) == 2


def test_every_weight_form_scores_alike_and_bf16_runs(model_and_export):
    """The backend reads through the one weights reader: the model file and its HF export give the
    same log-likelihoods (the other forms: tests/test_weights.py); bf16 runs too (GPU default)."""
    from lm_eval.api.instance import Instance

    from pretrain.eval.backend import PretrainLM

    model_file, export = model_and_export
    requests = [
        Instance("loglikelihood", {}, ("def f(x):\n", "    return x"), 0),
        Instance("loglikelihood", {}, ("", "import os"), 1),
    ]
    from_file = PretrainLM(str(model_file)).loglikelihood(requests, disable_tqdm=True)
    from_hf = PretrainLM(str(export)).loglikelihood(requests, disable_tqdm=True)
    assert from_file == from_hf
    in_bf16 = PretrainLM(str(model_file), dtype="bfloat16").loglikelihood(requests, disable_tqdm=True)
    assert [round(a, 1) for a, _ in in_bf16] == pytest.approx([round(a, 1) for a, _ in from_file], abs=0.3)


@pytest.mark.slow
def test_local_task_yamls_and_download_of_the_embedded_task(model_and_export, tmp_path, capsys):
    import yaml

    from pretrain.eval.harness import NEXT_LINE, embedded_task

    model_file, _ = model_and_export
    items = tmp_path / "items.jsonl"
    with open(items, "w") as f:
        for i in range(6):
            f.write(
                json.dumps({"context": f"x = {i}\n", "choices": [f"y = {i}", "import os"], "label": 0}) + "\n"
            )
    task = embedded_task(NEXT_LINE) | {
        "task": "my_local_task",
        "dataset_kwargs": {"data_files": {"test": str(items)}},
    }
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_local_task.yaml").write_text(yaml.safe_dump(task))
    args = ["eval", str(model_file), "--tasks", "my_local_task", "--include-path", str(tmp_path / "tasks")]
    assert main(args) == 0
    assert "my_local_task (acc_norm)" in capsys.readouterr().out
    assert main(["eval", "--download", NEXT_LINE]) == 0
    assert f"cached the datasets of 1 task(s): {NEXT_LINE}" in capsys.readouterr().out


def test_every_rank_knows_how_many_forward_passes_the_busiest_rank_makes():
    """Ranks pad to the same number of sharded forwards without a collective between them."""
    from pretrain.eval.backend import most_batches

    for requests in range(0, 60):
        for world in (1, 2, 3, 4):
            for batch in (1, 4, 16):
                per_rank = [len(range(requests)[rank::world]) for rank in range(world)]
                assert most_batches(requests, world, batch) == max(-(-n // batch) for n in per_rank)


# ---- run records: identity, damage, two writers; standard errors and chance levels ---------------


def write_training_checkpoint(path: Path, seed: int, tokenizer: str) -> str:
    """A checkpoint in `pretrain fit`'s form (weights of a random model of `seed`, a fresh
    checkpoint_id as written at save time); returns the id."""
    import uuid

    torch.manual_seed(seed)
    state = {f"model.{name}": value for name, value in Llama(CONFIG).state_dict().items()}
    checkpoint_id = uuid.uuid4().hex
    info = {"checkpoint_id": checkpoint_id, "model_config": CONFIG.to_dict(), "tokenizer": tokenizer}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": state, "pretrain": info | {"eos_id": 0, "bos_id": None, "tokens_seen": 1000 * seed}},
        path,
    )
    return checkpoint_id


@pytest.fixture(scope="module")
def next_line():
    from pretrain.eval.harness import load_tasks

    return load_tasks(["pystdlib_next_line"])


def make_lm(path: Path):
    from pretrain.eval.backend import PretrainLM

    return PretrainLM(str(path), batch_size=8)


def evaluate(run, tasks, log, limit=4):
    from pretrain.eval.runs import evaluate_run

    return evaluate_run(make_lm, run, tasks, None, limit, log=log)


def test_a_rewritten_checkpoint_is_scored_again_not_reported_with_the_old_scores(
    tiny_dataset, tmp_path, next_line
):
    from pretrain.run_dir import RunDir

    tokenizer = (tiny_dataset / "tokenizer.json").read_text()
    run = RunDir(tmp_path / "run")
    first = {step: write_training_checkpoint(run.checkpoint(step), step, tokenizer) for step in (1, 2)}
    lines: list[str] = []
    evaluate(run, next_line, lines.append)
    assert json.loads(run.eval_result(2).read_text())["checkpoint_id"] == first[2]
    # a rewind to step 1: step 2 set aside and written again, other weights under the same name
    rewritten = write_training_checkpoint(run.checkpoint(2), 7, tokenizer)
    lines.clear()
    table, records = evaluate(run, next_line, lines.append)
    assert lines == [
        "step-00000001.ckpt: already evaluated (num_fewshot=None limit=4)",
        f"{run.eval_result(2)}: it scored other weights than step-00000002.ckpt holds now (rewritten since); "
        "scoring step-00000002.ckpt again",
        "evaluating step-00000002.ckpt on pystdlib_next_line",
    ]
    assert records[2]["checkpoint_id"] == rewritten and records[2]["tokens"] == 7000
    assert json.loads(run.eval_result(2).read_text()) == records[2]
    assert "| step 2 (7K tokens) |" in table and "| step 2 (2K tokens) |" not in table


RECORD_DAMAGE = {
    "empty": (b"", "empty"),
    "truncated": (b'{"step": 1, "evalu', "not complete JSON (truncated?)"),
    "garbage": (b"\xff\xfe\x00garbage", "not UTF-8 text (garbage bytes)"),
    "number": (b"42", "not a record of `pretrain eval` (JSON of another shape)"),
    "list": (b"[]", "not a record of `pretrain eval` (JSON of another shape)"),
    "missing key": (
        b'{"step": 1, "tokens": 1000}',
        "not a record of `pretrain eval` (JSON of another shape)",
    ),
    "wrong-typed evaluations": (
        b'{"step": 1, "tokens": 1000, "checkpoint_id": "x", "evaluations": 42}',
        "not a record of `pretrain eval` (JSON of another shape)",
    ),
    "wrong-typed score": (
        b'{"step": 1, "tokens": 1000, "checkpoint_id": "x", "evaluations": '
        b'{"num_fewshot=None limit=4": {"pystdlib_next_line": {"acc": "high"}}}}',
        "not a record of `pretrain eval` (JSON of another shape)",
    ),
    "wrong-typed tokens": (
        b'{"step": 1, "tokens": "many", "checkpoint_id": "x", "evaluations": {}}',
        "not a record of `pretrain eval` (JSON of another shape)",
    ),
}


@pytest.fixture(scope="module")
def one_checkpoint_run(tiny_dataset, tmp_path_factory):
    from pretrain.run_dir import RunDir

    run = RunDir(tmp_path_factory.mktemp("damaged") / "run")
    write_training_checkpoint(run.checkpoint(1), 1, (tiny_dataset / "tokenizer.json").read_text())
    return run


@pytest.mark.parametrize("damage", RECORD_DAMAGE.values(), ids=RECORD_DAMAGE.keys())
def test_a_damaged_score_record_is_scored_again_in_one_line(one_checkpoint_run, next_line, damage):
    run = one_checkpoint_run
    content, why = damage
    run.eval_dir.mkdir(exist_ok=True)
    run.eval_result(1).write_bytes(content)
    (run.eval_dir / "table.md").write_bytes(b"\xff\xfe")  # rebuilt from the records, never read
    lines: list[str] = []
    table, records = evaluate(run, next_line, lines.append)
    assert lines == [
        f"{run.eval_result(1)}: {why}; scoring step-00000001.ckpt again",
        "evaluating step-00000001.ckpt on pystdlib_next_line",
    ]
    assert json.loads(run.eval_result(1).read_text()) == records[1]
    assert (run.eval_dir / "table.md").read_text() == table


def test_two_evals_of_one_run_at_once_keep_both_results(one_checkpoint_run, next_line, tmp_path):
    """The second command starts while the first scores the checkpoint (its read-modify-write
    interleaved with the first's): it waits, then adds its task to the first's record and table."""
    import threading

    from pretrain.eval.harness import load_tasks
    from pretrain.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    (run.checkpoint(1)).symlink_to(one_checkpoint_run.checkpoint(1))
    other = load_tasks(["my_local_task"], str(_local_task_folder(tmp_path)))
    second_lines: list[str] = []
    second_waits = threading.Event()
    second = threading.Thread(
        target=lambda: evaluate(run, other, lambda line: (second_lines.append(line), second_waits.set()))
    )

    def first_lm(path: Path):
        second.start()  # while the first holds what it read
        second_waits.wait(timeout=120)
        return make_lm(path)

    from pretrain.eval.runs import evaluate_run

    evaluate_run(first_lm, run, next_line, None, 4, log=lambda line: None)
    second.join(timeout=300)
    assert (
        second_lines[0]
        == f"{run.eval_result(1)}: another `pretrain eval` is writing it; waiting for it to finish"
    )
    done = json.loads(run.eval_result(1).read_text())["evaluations"]["num_fewshot=None limit=4"]
    assert set(done) == {"pystdlib_next_line", "my_local_task"}
    table = (run.eval_dir / "table.md").read_text()
    assert "|  | my_local_task (acc_norm) | pystdlib_next_line (acc_norm) | average |" in table


def _local_task_folder(root: Path) -> Path:
    """A folder with the task YAML `my_local_task`: items with 2, 3 and 4 choices."""
    import yaml

    from pretrain.eval.harness import NEXT_LINE, embedded_task

    items = root / "items.jsonl"
    with open(items, "w") as f:
        for i in range(6):
            choices = [f"y = {i}", "import os", "pass", "x += 1"][: 2 + i % 3]
            f.write(json.dumps({"context": f"x = {i}\n", "choices": choices, "label": 0}) + "\n")
    task = embedded_task(NEXT_LINE) | {
        "task": "my_local_task",
        "dataset_kwargs": {"data_files": {"test": str(items)}},
    }
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "my_local_task.yaml").write_text(yaml.safe_dump(task))
    return root / "tasks"


@pytest.mark.slow
def test_scores_keep_standard_errors_and_the_chance_level_of_the_documents_evaluated(
    model_and_export, tmp_path, next_line
):
    from pretrain.eval.harness import chance_levels, load_tasks, score_tasks

    tasks = load_tasks(["my_local_task"], str(_local_task_folder(tmp_path))) | next_line
    assert chance_levels(tasks, 2) == {
        "my_local_task": pytest.approx((1 / 2 + 1 / 3) / 2),
        "pystdlib_next_line": 0.25,
    }
    assert chance_levels(tasks, 0.5)["my_local_task"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    found = score_tasks(make_lm(model_and_export[0]), next_line, limit=8)["pystdlib_next_line"]
    assert set(found) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance"}
    assert found["chance"] == 0.25 and 0 < found["acc_stderr"] < 0.5


@pytest.mark.slow
def test_two_eval_commands_run_at_once_on_one_run_keep_both_results(model_and_export, tmp_path):
    """Two real `pretrain eval RUN_DIR` processes started together, on other tasks: every record
    and the table hold both commands' scores, and neither fails."""
    import subprocess

    from helpers import PRETRAIN

    from pretrain.run_dir import RunDir

    model_file, _ = model_and_export
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    for step in (10, 20):
        (run.checkpoints / f"step-{step:08d}.ckpt").write_bytes(model_file.read_bytes())
    common = [
        PRETRAIN,
        "eval",
        str(run.path),
        "--limit",
        "6",
        "--include-path",
        str(_local_task_folder(tmp_path)),
    ]
    commands = [common + ["--tasks", task] for task in ("pystdlib_next_line", "my_local_task")]
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0 and "Traceback" not in err, err[-2000:]
    for step in (10, 20):
        done = json.loads(run.eval_result(step).read_text())["evaluations"]["num_fewshot=None limit=6"]
        assert set(done) == {"pystdlib_next_line", "my_local_task"}
    table = (run.eval_dir / "table.md").read_text()
    assert (
        table.count("| step ") == 2
        and "my_local_task (acc_norm)" in table
        and "pystdlib_next_line (acc_norm)" in table
    )
