"""lm-evaluation-harness backend over pretrain's own Llama: `lm_eval run --model pretrain`.

`PretrainLM` scores requests the way lm-eval's `hf` backend scores the same model exported with
`pretrain export-hf`, so the two agree per request (tests/test_eval.py):

- Text is encoded as Hugging Face clients encode it: the checkpoint's tokenizer with the
  post-processor `export-hf` writes (BOS prepended only when training put BOS before documents).
- The prefix of an empty context and of each rolling window is the token that preceded every
  document in training: BOS when the data had one, else EOS (`document_prefix_id`).
- `loglikelihood`: (context + continuation) cut to the last `max_length` tokens, one forward pass,
  the continuation's log-probabilities summed, and whether each of its tokens was the argmax.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens.
- `generate_until`: `pretrain.model.generate` (KV cache, greedy unless the task samples), cut
  at the first stop string.

Requests are batched longest first (`batch_size` sequences, right-padded: a causal model's
padding never reaches the real tokens). Weights: any form `pretrain.model.checkpoint` reads
(`ema=true` for a training checkpoint's EMA copy), in bfloat16 on a GPU that has it, else float32.

Under several processes (`pretrain.train.callbacks.downstream`, FSDP2), `group` splits the scoring
requests across ranks, each rank's share in the same number of forward passes (sharded weights
are gathered layer by layer in every rank's forward, so every rank must run each one), and the
scores are all-gathered: every rank returns all of them. Generation requests are not split:
every rank generates all of them, stopping together.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tokenizers import Tokenizer
from tqdm import tqdm

from pretrain.errors import UserError
from pretrain.model import Llama
from pretrain.model.generate import Sampling, generate, load_generation_model
from pretrain.model.hf import client_tokenizer_json, document_prefix_id

Request = tuple[Any, list[int], list[int]]  # (key, context ids, continuation ids)


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that has it, else float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def most_batches(requests: int, world: int, batch_size: int) -> int:
    """Forward passes of the rank with the most requests (rank 0: request i goes to rank i mod
    world), known to every rank without communicating: no collective between the sharded forwards."""
    return math.ceil(math.ceil(requests / world) / batch_size)


class PretrainLM(TemplateLM):
    """An lm-eval `LM` over a pretrain model (module docstring)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        ema: bool | str = False,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 16,
        max_length: int | None = None,
        **ignored: Any,  # lm-eval passes max_batch_size and others every backend may ignore
    ) -> None:
        super().__init__()
        if checkpoint is None:
            raise UserError(
                "--model pretrain needs --model_args checkpoint=PATH (a checkpoint or HF directory)"
            )
        on = torch.device(device or "cuda" if torch.cuda.is_available() else "cpu")
        if device and torch.device(device) != on:  # lm_eval's CLI asks for cuda by default, as `hf` does
            print(f"pretrain backend: device {device} is not available here; using the CPU", file=sys.stderr)
        weights = default_dtype(on) if dtype == "auto" else getattr(torch, dtype, None)
        if not isinstance(weights, torch.dtype):
            raise UserError(f"model_args dtype={dtype!r}: use auto, float32 or bfloat16")
        loaded = load_generation_model(checkpoint, on, weights, ema=str(ema).lower() in ("true", "1"))
        if not loaded.eos_ids:
            raise UserError(
                f"{checkpoint}: no end-of-document token is known (config eos_token_id, or the tokenizer's)"
            )
        self._setup(
            loaded.model, loaded.tokenizer, loaded.bos_id, min(loaded.eos_ids), batch_size, max_length
        )
        self.tokens_seen = loaded.tokens_seen

    @classmethod
    def from_model(
        cls,
        model: Llama,
        tokenizer_json: str,
        bos_id: int | None,
        eos_id: int,
        batch_size: int = 16,
        group: Any = None,
        forward_context: Callable[[], Any] | None = None,
    ) -> PretrainLM:
        """A backend over a model in memory (the one being trained): no checkpoint is read."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        tokenizer = Tokenizer.from_str(client_tokenizer_json(tokenizer_json, bos_id))
        lm._setup(model, tokenizer, bos_id, eos_id, batch_size, None, group, forward_context)
        return lm

    def _setup(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        bos_id: int | None,
        eos_id: int,
        batch_size: int | str,
        max_length: int | None,
        group: Any = None,
        forward_context: Callable[[], Any] | None = None,
    ) -> None:
        if str(batch_size).startswith("auto"):
            batch_size = 16
        if int(batch_size) < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer_ = tokenizer
        self.eos_id = eos_id
        self.prefix_id = document_prefix_id(bos_id, eos_id)
        self.prefix_text = tokenizer.decode([self.prefix_id], skip_special_tokens=False)
        self.batch_size = int(batch_size)
        self.max_length = max_length or model.config.max_seq_len
        self.group = group
        self.forward_context = forward_context or contextlib.nullcontext

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.prefix_id

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:  # as lm-eval's `hf`: a string that starts with BOS gets no second
            add_special_tokens = not string.startswith(self.prefix_text)
        return list(self.tokenizer_.encode(string, add_special_tokens=add_special_tokens).ids)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer_.decode(list(tokens), skip_special_tokens=False)

    # -- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        rows = [
            (context + continuation)[-(self.max_length + 1) :][:-1] for _, context, continuation in requests
        ]
        continuations = [continuation for _, _, continuation in requests]
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), rows[i]))
        rank, world = self._rank_and_world()
        mine = order[rank::world]
        batches = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        scored: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=len(mine), desc="scoring", disable=disable_tqdm or rank != 0)
        for batch in batches:
            scores = self._score_batch([rows[i] for i in batch], [continuations[i] for i in batch])
            scored |= dict(zip(batch, scores))
            bar.update(len(batch))
        bar.close()
        for _ in range(most_batches(len(rows), world, self.batch_size) - len(batches)):  # every rank in step
            self._forward(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        scored = self._all_scores(scored)
        for (key, _, _), i in zip(requests, range(len(rows))):
            if key is not None:  # lm-eval's response cache (--use_cache)
                self.cache_hook.add_partial("loglikelihood", key, scored[i])
        return [scored[i] for i in range(len(rows))]

    def _score_batch(self, rows: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Per row: the continuation's summed log-probability, and whether it is the greedy choice."""
        width = max(len(row) for row in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
        logits = self._forward(tokens.to(self.device))
        scores = []
        for r, (row, continuation) in enumerate(zip(rows, continuations)):
            n = len(continuation)  # position p predicts token p + 1; only these positions are normalized
            predicted = F.log_softmax(logits[r, len(row) - n : len(row)].float(), dim=-1)
            targets = torch.tensor(continuation, device=predicted.device)
            greedy = bool((predicted.argmax(dim=-1) == targets).all())
            scores.append((float(predicted.gather(-1, targets[:, None]).sum()), greedy))
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[Request] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (string,) = request.args
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        out: list[str] = [""] * len(requests)
        bar = tqdm(
            total=len(requests), desc="generating", disable=disable_tqdm or self._rank_and_world()[0] != 0
        )
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            stops = [*until, self.tok_decode([self.eos_id])]
            new_tokens = min(int(settings.pop("max_gen_toks", 256)), self.max_length - 1)
            sampling = Sampling(
                temperature=float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
            )
            contexts = {
                i: self.tok_encode(requests[i].args[0])[-(self.max_length - new_tokens) :] for i in indices
            }
            ordered = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start : start + self.batch_size]
                with self.forward_context():
                    completions = generate(
                        [(self.model, 1.0)],
                        [contexts[i] for i in batch],
                        new_tokens,
                        sampling,
                        {self.eos_id},
                        all_done=self._all_done,
                    )
                for i, tokens in zip(batch, completions):
                    text = self.tok_decode(tokens)
                    for stop in stops:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    # -- one process or several ----------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.forward_context():
            logits = self.model(tokens).logits
        assert logits is not None  # only a loss computed in chunks leaves it out
        return logits

    def _rank_and_world(self) -> tuple[int, int]:
        if self.group is None:
            return 0, 1
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def _all_scores(self, scored: dict[int, tuple[float, bool]]) -> dict[int, tuple[float, bool]]:
        if self.group is None:
            return scored
        parts: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, scored, group=self.group)
        return {key: value for part in parts for key, value in part.items()}

    def _all_done(self, done: bool) -> bool:
        """Whether every rank's rows are done (generation stops on all ranks together)."""
        if self.group is None:
            return done
        flag = torch.tensor([int(done)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())
