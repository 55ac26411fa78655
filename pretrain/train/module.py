"""The training step: `PretrainModule`, a LightningModule around our Llama.

One optimizer step = the micro-batches of one global batch (Lightning accumulates). The loss is
next-token cross-entropy (+ `moe_aux_loss_coef` x the MoE load-balancing loss). Everything that
varies over training is a pure function of the optimizer step: the LR (`pretrain.train.schedules`),
the data position (the data module), and the RNG, which is reseeded from (seed, step, rank) at
every step, so a resumed run needs no RNG state and reproduces an uninterrupted one exactly.

The model is built on the CPU from the seed in `configure_model` (the Lightning hook for it),
so its initial weights are the same whatever the number of devices, then parallelized there
(`pretrain.train.parallelize`: activation checkpointing, compile, FSDP2). The execution settings
(attention kernel, compile, activation checkpointing, loss chunking) are arguments of this
module, not fields of the architecture: a run may change them when it resumes.

With `trainable_blocks`, only the named transformer blocks train (LLaMA Pro's recipe for new
blocks inserted by `pretrain expand`): every other parameter is frozen (requires_grad False)
before wrapping and sharding, so it gets no gradient, no optimizer state and no update. Under
FSDP2 frozen blocks stay sharded like the others (gathered for forward and backward, nothing
reduced), and checkpoints hold optimizer state for the trainable parameters only.

A bad step (a non-finite loss or gradient norm, or a loss spike: `pretrain.train.spike_guard`)
is skipped (no parameter or optimizer-state change), counted and reported in one line. A streak
of them is judged either a new loss level (training goes on) or a divergence; on a divergence,
`on_divergence: rollback` (the default) ends this `trainer.fit` with `divergence` set, and
`pretrain fit` reloads the newest checkpoint from before the streak in the same process and steps
over the samples read since (`pretrain.train.rollback`); `on_divergence: stop`, or more than
`max_rollbacks` rollbacks in a row, stops the run (exit 3) naming that checkpoint.
"""

from __future__ import annotations

import math
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig, LlamaOutput, get_preset
from pretrain.model.attention import BACKENDS, document_ids
from pretrain.model.checkpoint import load_model_checkpoint, open_checkpoint, training_checkpoint_problem
from pretrain.model.loss import auto_chunk_tokens
from pretrain.run_dir import RunDir
from pretrain.train.datamodule import trainer_datamodule
from pretrain.train.evaluation import LossSums
from pretrain.train.parallelize import ACTIVATION_CHECKPOINTING, parallelize
from pretrain.train.schedules import LRSchedule, WarmupCosine
from pretrain.train.spike_guard import SpikeGuard

ON_DIVERGENCE = ("rollback", "stop")


@dataclass
class Divergence:
    """A streak of bad steps judged a divergence: steps `first`..`last`, why, and what to do."""

    first: int
    last: int
    why: str
    action: str  # "rollback" or "stop"
    checkpoint: Path | None  # the newest checkpoint from before `first` (rolled back to)
    checkpoint_step: int


class PretrainModule(L.LightningModule):
    """Next-token prediction with a Llama model (see the module docstring).

    Args:
        model: a preset name (`pretrain model-info` lists them).
        model_overrides: fields of `LlamaConfig` to change from the preset (e.g. `n_layers`).
        lr_schedule: LR as a function of the optimizer step (default: TinyLlama's cosine).
        weight_decay, betas, eps: AdamW (torch's fused implementation on CPU and CUDA).
        decay_norms_and_embeddings: also apply weight decay to norm gains and the embedding.
        moe_aux_loss_coef: weight of the MoE load-balancing loss.
        document_masking: attend only within documents (EOS boundaries) of a packed sequence.
        attention_backend: attention kernel (`pretrain.model.attention.BACKENDS`): "sdpa" (PyTorch
            picks), "sdpa-flash" / "sdpa-cudnn" / "sdpa-efficient" / "sdpa-math" (pinned), "flash"
            (flash-attn), "xformers".
        activation_checkpointing: "none"; "selective" (keep the outputs of matmuls and attention,
            recompute the cheap element-wise ops: norms, RoPE, SiLU; `pretrain.train.parallelize`);
            or "full" (keep only each block's input, recompute the whole block in backward).
        compile: `torch.compile` each transformer block.
        compile_cache: with `compile`, where the compiled artifacts are kept for the next launch
            (`pretrain.train.parallelize.use_compile_cache`); None: `RUN_DIR/compile_cache/`. A path
            on a shared filesystem lets every node (and other runs of the same model) reuse them.
        loss_chunk_tokens: compute the cross-entropy this many tokens at a time, never holding the
            logits of the whole micro-batch (`pretrain.model.loss`); None: all at once; "auto"
            (default): chunks of about 2^23 logits once a micro-batch's logits are larger
            (`pretrain.model.loss.auto_chunk_tokens`), said in one line when chosen.
        sharding: under FSDP2, "full" (shard over all ranks) or "hybrid" (replicate across nodes).
        max_bad_steps: a streak of this many bad steps in a row (non-finite, or loss spikes) is
            judged: a new loss level, or a divergence (`pretrain.train.spike_guard`).
        spike_threshold: a step whose loss lies more than this many standard deviations (at least
            1% of the mean) above the mean of the last `spike_window` good steps is skipped as a
            spike; null: only non-finite steps are skipped.
        spike_window: how many recent good steps the spike threshold is measured against.
        on_divergence: "rollback" (reload the newest checkpoint from before the streak and step
            over the samples read since, in the same process) or "stop" (exit 3).
        max_rollbacks: rollbacks in a row (since the run's last stop) before a divergence stops it.
        rollback_skip_margin: optimizer steps' worth of samples skipped beyond the streak's end.
        rollback_lr_scale: LR factor for the steps re-done after a rollback (up to the end of the
            skipped window); 1: the schedule's LR.
        seed: seeds the initial weights and the per-step RNG.
        init_from: start a new stage from these weights (continual pretraining): a checkpoint of
            ours (training checkpoint, FSDP2 directory, `pretrain average`/`import-hf` output) or a
            local Hugging Face Llama/Mixtral directory. Weights only: optimizer, step counter and
            LR schedule start fresh. Ignored when the run resumes from its own checkpoint.
        trainable_blocks: train only these transformer blocks (indices), or "new": the blocks that
            `pretrain expand` recorded as new in the init_from checkpoint. Embedding, final norm,
            LM head and all other blocks are frozen. None (default): train everything.
    """

    def __init__(
        self,
        model: str = "tiny",
        model_overrides: dict[str, Any] | None = None,
        lr_schedule: LRSchedule | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        decay_norms_and_embeddings: bool = False,
        moe_aux_loss_coef: float = 0.01,
        document_masking: bool = False,
        attention_backend: str = "sdpa",
        activation_checkpointing: str = "none",
        compile: bool = False,
        compile_cache: str | None = None,
        loss_chunk_tokens: int | Literal["auto"] | None = "auto",
        sharding: str = "full",
        max_bad_steps: int = 10,
        spike_threshold: float | None = 6.0,
        spike_window: int = 100,
        on_divergence: str = "rollback",
        max_rollbacks: int = 3,
        rollback_skip_margin: int = 10,
        rollback_lr_scale: float = 1.0,
        seed: int = 1337,
        init_from: str | None = None,
        trainable_blocks: list[int] | str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lr_schedule"])
        self.config: LlamaConfig = get_preset(model).replace(**(model_overrides or {}))
        self.lr_schedule = lr_schedule or WarmupCosine(max_lr=4e-4, min_lr=4e-5, warmup_steps=2000)
        if attention_backend not in BACKENDS:
            raise UserError(
                f"model.attention_backend must be one of {', '.join(BACKENDS)}, got {attention_backend!r}"
            )
        if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise UserError(f"model.activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}")
        if loss_chunk_tokens not in (None, "auto") and (
            not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 1
        ):
            raise UserError(
                f"model.loss_chunk_tokens must be a positive token count, auto or null, got {loss_chunk_tokens!r}"
            )
        if sharding not in ("full", "hybrid"):
            raise UserError("model.sharding must be 'full' or 'hybrid'")
        self.model: Llama | None = None
        self.eos_id: int | None = None  # set by the data module when document masking is on
        self._step_loss_sum: torch.Tensor | None = None
        self._step_micro_batches = 0
        if max_bad_steps < 1 or spike_window < 2 or (spike_threshold is not None and spike_threshold <= 0):
            raise UserError(
                "model.max_bad_steps must be >= 1, spike_window >= 2 and spike_threshold > 0 (or null)"
            )
        if on_divergence not in ON_DIVERGENCE:
            raise UserError(
                f"model.on_divergence must be one of {', '.join(ON_DIVERGENCE)}, got {on_divergence!r}"
            )
        if max_rollbacks < 0 or rollback_skip_margin < 0 or not 0 < rollback_lr_scale <= 1:
            raise UserError(
                "model.max_rollbacks and rollback_skip_margin must be >= 0 and rollback_lr_scale in (0, 1]"
            )
        self.guard = SpikeGuard(spike_threshold, spike_window, max_bad_steps, self.config.vocab_size)
        self.skipped_steps = 0
        self.grad_norm_outliers = 0
        self.stop_reason: str | None = None
        self.divergence: Divergence | None = None
        self.rollbacks_in_a_row = 0  # set by `pretrain fit` from the run's incidents
        self.lr_scaled_steps: list[
            tuple[int, int, float]
        ] = []  # [first, stop) steps x factor, after rollbacks
        self.new_stage: str | None = None  # why this launch starts a new stage (set by `pretrain fit`)
        self.own_checkpoint_ids: set[str] = set()  # the checkpoints this run wrote or resumed from
        self.resuming = False  # set by `pretrain fit` when a checkpoint will restore the weights
        self.init_source: dict[str, Any] | None = None
        self.expansion: dict[str, Any] | None = None  # `pretrain expand`'s record, kept in checkpoints
        self.branched_from: str | None = None  # the checkpoint a `branch_from` run started from
        self._val_sums = LossSums()
        self._auto_chunks: dict[int, int | None] = {}  # micro-batch tokens -> chosen chunk (auto)

    def setup(self, stage: str) -> None:
        data = trainer_datamodule(self.trainer)
        if data is not None and data.vocab_size is not None:
            if data.vocab_size > self.config.vocab_size:
                raise UserError(
                    f"the data's tokenizer has {data.vocab_size:,} tokens but the model's vocab_size is "
                    f"{self.config.vocab_size:,}: set model.model_overrides.vocab_size >= {data.vocab_size}"
                )
            self.eos_id = data.eos_id

    # ---- model construction and parallelism -------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        generator_state = torch.get_rng_state()
        torch.manual_seed(self.hparams["seed"])
        with torch.device("cpu"):
            model = Llama(self.config, self.hparams["attention_backend"])
        torch.set_rng_state(generator_state)
        if self.hparams["init_from"] and not self.resuming:
            self._load_initial_weights(model, self.hparams["init_from"])
        if self.hparams["trainable_blocks"] is not None:
            model.requires_grad_(False)
            for i in self._trainable_block_indices():
                model.layers[i].requires_grad_(True)
        trainer = self._attached_trainer()
        parallelize(
            model,
            activation_checkpointing=self.hparams["activation_checkpointing"],
            compile=self.hparams["compile"],
            strategy=trainer.strategy if trainer is not None else None,
            sharding=self.hparams["sharding"],
            bf16=trainer is not None and str(trainer.precision).startswith("bf16"),
            num_nodes=trainer.num_nodes if trainer is not None else 1,
            compile_cache=self._compile_cache(trainer),
        )
        self.model = model

    def _compile_cache(self, trainer: L.Trainer | None) -> Path | None:
        """`compile_cache`, else the run directory's (`RunDir.compile_cache`); None outside a run."""
        if self.hparams["compile_cache"]:
            return Path(self.hparams["compile_cache"])
        return RunDir(trainer.default_root_dir).compile_cache if trainer is not None else None

    def _attached_trainer(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # built outside a Trainer (tests, tools)
            return None

    def _load_initial_weights(self, model: Llama, source: str) -> None:
        """Copy the weights of `source` (any form `pretrain.model.checkpoint` reads) into the new model."""
        checkpoint = load_model_checkpoint(source)
        if checkpoint.config != self.config:
            raise UserError(
                f"model.init_from {source}: its model config differs from this run's "
                f"({checkpoint.config.to_dict()} vs {self.config.to_dict()}); make model/model_overrides match it"
            )
        self.expansion = checkpoint.meta.get("expansion")
        kind = (
            "huggingface" if checkpoint.meta.get("source", {}).get("kind") == "huggingface" else "checkpoint"
        )
        self.init_source = {"kind": kind, "path": str(Path(source).resolve())} | {
            k: checkpoint.meta[k]
            for k in ("global_step", "tokens_seen")
            if checkpoint.meta.get(k) is not None
        }
        model.load_state_dict(checkpoint.state_dict, strict=True)

    def _trainable_block_indices(self) -> list[int]:
        """`trainable_blocks` as block indices ("new": read from the init_from checkpoint's meta)."""
        blocks = self.hparams["trainable_blocks"]
        if blocks == "new":
            blocks = self._expanded_blocks(self.hparams["init_from"])
        elif isinstance(blocks, str):
            raise UserError(
                f'model.trainable_blocks must be a list of block indices or "new", got {blocks!r}'
            )
        n_layers = self.config.n_layers
        if not blocks or any(not 0 <= i < n_layers for i in blocks):
            raise UserError(
                f"model.trainable_blocks {blocks}: name at least one block, indices in [0, {n_layers - 1}]"
            )
        return sorted(set(blocks))

    @staticmethod
    def _expanded_blocks(init_from: str | None) -> list[int]:
        """The new blocks `pretrain expand` recorded in the meta of the model file `init_from`."""
        if not init_from:
            raise UserError(
                "model.trainable_blocks: new needs model.init_from: a model written by `pretrain expand`"
            )
        expansion = open_checkpoint(init_from).meta.get("expansion")
        if not expansion:
            raise UserError(
                f"model.trainable_blocks: new: {init_from} records no new blocks (it was not written by "
                "`pretrain expand`); list the blocks to train instead, e.g. trainable_blocks: [2, 5]"
            )
        return expansion["new_layers"]

    # ---- optimization ------------------------------------------------------------------------

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        assert self.model is not None  # built in configure_model, which Lightning calls first
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.dim() < 2 or "tok_embeddings" in name
            (no_decay if exempt and not self.hparams["decay_norms_and_embeddings"] else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.device.type in ("cpu", "cuda")  # measured faster on CPU too (docs/performance.md)
        # lr=1.0: the LambdaLR factor below *is* the absolute learning rate.
        optimizer = torch.optim.AdamW(
            groups, lr=1.0, betas=tuple(self.hparams["betas"]), eps=self.hparams["eps"], fused=fused
        )
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise UserError("the trainer needs max_steps (or max_tokens) to define the LR schedule")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_schedule(step, total_steps) * self.lr_factor(step)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Set the LR of the first step from the schedule: a restored optimizer holds the LR its run
        computed, which differs when a branch (`branch_from`) changes the schedule."""
        step = self.trainer.global_step
        lr = self.lr_schedule(step, self.trainer.max_steps) * self.lr_factor(step)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def lr_factor(self, step: int) -> float:
        """The temporary LR factor of `step` (`rollback_lr_scale` over a rolled-back window), else 1."""
        return math.prod(factor for first, stop, factor in self.lr_scaled_steps if first <= step < stop)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._step_micro_batches == 0:  # first micro-batch of an optimizer step
            key = [self.hparams["seed"], self.trainer.global_step, self.trainer.global_rank]
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._forward(*batch)
        loss = out.loss
        detached = loss.detach()
        self._step_loss_sum = detached if self._step_loss_sum is None else self._step_loss_sum + detached
        self._step_micro_batches += 1
        if self.config.is_moe:
            self.log("train/moe_aux_loss", out.aux_loss.detach(), on_step=True, sync_dist=True)
            return loss + self.hparams["moe_aux_loss_coef"] * out.aux_loss
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm (correct under FSDP2: the norm is reduced over shards), log it, and
        skip the step if it is bad (non-finite or a spike: `SpikeGuard`). Once per optimizer step."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise UserError("only gradient_clip_algorithm: norm is supported")
        assert self.model is not None and self._step_loss_sum is not None  # set up / accumulated by now
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if gradient_clip_val:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: reduce over the shards
            norm = norm.full_tensor()
        step_loss = self._step_loss_sum / max(self._step_micro_batches, 1)
        self._step_loss_sum, self._step_micro_batches = None, 0
        step_loss = self.trainer.strategy.reduce(step_loss, reduce_op="mean")  # every rank judges alike
        self.log("train/loss", step_loss, on_step=True)
        self.log("train/grad_norm", norm, on_step=True)
        step = self.trainer.global_step
        judgment = self.guard.judge(step, float(step_loss), float(norm), self._weight_norm())
        if judgment.grad_norm_outlier:
            self.grad_norm_outliers += 1
            self.log("train/grad_norm_outliers", float(self.grad_norm_outliers), on_step=True)
        if judgment.message and self.trainer.is_global_zero:
            print(f"spike guard: {judgment.message}", file=sys.stderr)
        if not judgment.skip:
            return
        for param in params:  # AdamW leaves parameters without a gradient untouched
            param.grad = None
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        if judgment.verdict == "divergence":
            self._diverged(step, judgment.why)

    def _weight_norm(self) -> float:
        """The norm of all trainable weights (what the last update changed), reduced over shards."""
        assert self.model is not None
        norm = torch.nn.utils.get_total_norm(
            [p.detach() for p in self.model.parameters() if p.requires_grad], norm_type=2.0
        )
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _diverged(self, step: int, why: str) -> None:
        """Roll back (`pretrain fit` does it once this fit ends) or stop, and say which."""
        first = self.guard.suspect_since
        assert first is not None
        step_before, before = self._checkpoint_before(first)
        action = "stop"
        if self.hparams["on_divergence"] == "rollback" and before is not None:
            if self.rollbacks_in_a_row < self.hparams["max_rollbacks"]:
                action = "rollback"
        self.divergence = Divergence(first, step, why, action, before, step_before)
        self.trainer.should_stop = True
        self.trainer.limit_val_batches = 0  # Lightning validates before an early stop: not now
        if action == "stop":
            self.stop_reason = self._divergence_message(first, why, before)

    def _checkpoint_before(self, first: int) -> tuple[int, Path | None]:
        """The newest usable checkpoint of this run from before step `first`, and its step (rank 0
        decides)."""
        found: tuple[int, Path | None] = (-1, None)
        if self.trainer.is_global_zero:
            run = RunDir(self.trainer.default_root_dir)
            usable = (
                (s, p)
                for s, p in reversed(run.list_checkpoints())
                if s < first and training_checkpoint_problem(p) is None
            )
            found = next(usable, found)
        return self.trainer.strategy.broadcast(found, src=0)

    def _divergence_message(self, first: int, why: str, before: Path | None) -> str:
        """The stop message: what went wrong since when, and the checkpoint the run resumes from."""
        if self.hparams["on_divergence"] == "stop":
            cause = "model.on_divergence is stop"
        elif before is None:
            cause = f"no checkpoint from before step {first} exists to roll back to"
        else:
            cause = f"{self.rollbacks_in_a_row} rollbacks in a row did not get past it (model.max_rollbacks {self.hparams['max_rollbacks']})"
        resume = (
            f"the same command resumes from {before} (the newest checkpoint from before step {first}; kept for "
            "this): change what caused it first, e.g. a lower --model.lr_schedule.init_args.max_lr"
            if before is not None
            else f"no checkpoint from before step {first} exists: start again with a lower learning rate"
        )
        return (
            f"divergence from step {first} ({why}); stopped because {cause}. {resume}. The state at the "
            "stop is kept as diverged-step-*.ckpt for inspection; --resume auto never picks it"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what `export-hf`, `init_from` and `generate` need to use the weights alone."""
        data = trainer_datamodule(self.trainer)
        checkpoint["pretrain"] = {
            # written during a streak of bad steps (the state at a stop): never resumed from by --resume auto
            "diverged": self.guard.suspect_since is not None,
            "data_identity": data.data_identity(),
            # the identity of these weights: records about a checkpoint (scores, incidents) key on it
            "checkpoint_id": self._new_checkpoint_id(),
            "model_config": self.config.to_dict(),
            "tokenizer": data.tokenizer_json,
            "bos_id": data.bos_id,
            "eos_id": data.eos_id,
            "global_step": self.trainer.global_step,
            "tokens_seen": self.trainer.global_step * data.global_batch_tokens,
            "skipped_steps": self.skipped_steps,
            "grad_norm_outliers": self.grad_norm_outliers,
            "spike_guard": self.guard.state_dict(),
            "max_steps": self.trainer.max_steps,
            "init_from": self.init_source,
            "expansion": self.expansion,
            "branched_from": self.branched_from,
        }

    def _new_checkpoint_id(self) -> str:
        identity = self.trainer.strategy.broadcast(uuid.uuid4().hex, src=0)
        self.own_checkpoint_ids.add(identity)
        return identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("pretrain", {}).get("model_config")
        if saved is not None and LlamaConfig.from_dict(saved) != self.config:
            raise UserError(
                "the checkpoint's model config differs from this run's model config: "
                f"checkpoint {saved} vs run {self.config.to_dict()}"
            )
        self.skipped_steps = checkpoint.get("pretrain", {}).get("skipped_steps", 0)
        self._note_a_stretched_schedule(
            checkpoint.get("pretrain", {}).get("max_steps"), checkpoint.get("global_step", 0)
        )
        self.grad_norm_outliers = checkpoint.get("pretrain", {}).get("grad_norm_outliers", 0)
        if loaded_id := checkpoint.get("pretrain", {}).get("checkpoint_id"):
            self.own_checkpoint_ids.add(loaded_id)
        if "spike_guard" in checkpoint.get("pretrain", {}):
            self.guard.load_state_dict(checkpoint["pretrain"]["spike_guard"])
        self._restart_the_guard_for_a_new_stage(checkpoint.get("pretrain", {}))
        self.init_source = checkpoint.get("pretrain", {}).get("init_from")
        self.expansion = checkpoint.get("pretrain", {}).get("expansion")
        # A branch's first launch loads its parent's checkpoint: keep the branch point set by `fit`.
        self.branched_from = self.branched_from or checkpoint.get("pretrain", {}).get("branched_from")

    def _restart_the_guard_for_a_new_stage(self, saved: dict[str, Any]) -> None:
        """A launch that trains on other data than its checkpoint did, or branches off it, is a new
        stage: its loss is judged against its own steps, never the previous stage's."""
        reason = self.new_stage
        data = trainer_datamodule(self.trainer)
        if reason is None and saved.get("data_identity") not in (None, data.data_identity()):
            reason = "the training data changed since the checkpoint"
        if reason is not None and (self.guard.history or self.guard.streak):
            self.guard.restart()
            if self.trainer.is_global_zero:
                print(f"spike guard: history restarts ({reason})", file=sys.stderr)

    def _note_a_stretched_schedule(self, saved_max_steps: int | None, step: int) -> None:
        """A run resumed with another length recomputes its LR schedule over the new length: say what
        that does to the LR at the resume step (a cosine stretched over more steps jumps up). Not on a
        branch's first launch (`branched_from` is set by `fit` only then): it sets its own schedule."""
        new = self.trainer.max_steps
        if saved_max_steps in (None, new) or self.branched_from or not self.trainer.is_global_zero:
            return
        before, after = self.lr_schedule(step, saved_max_steps), self.lr_schedule(step, new)
        if abs(after - before) > 1e-3 * max(abs(before), 1e-12):
            print(
                f"note: the run's length changed from {saved_max_steps:,} to {new:,} steps, so its LR schedule is "
                f"recomputed: the LR at step {step:,} goes from {before:.3g} to {after:.3g}. To extend a run without "
                "a jump, train with a schedule whose LR does not depend on the length before its decay (WSD, "
                "Infinite, MultiStep) and branch the decay off with branch_from (README: Continual pretraining)",
                file=sys.stderr,
            )

    # ---- validation --------------------------------------------------------------------------

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        inputs, targets = batch
        source = trainer_datamodule(self.trainer).val_source_names[dataloader_idx]
        self._val_sums.add(source, self.summed_loss(inputs, targets), targets.numel())

    def summed_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over the batch's tokens (validation; also of EMA/LaWA weights)."""
        return self._forward(inputs, targets).loss * targets.numel()

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> LlamaOutput:
        """The model on a batch, with its mean loss (document masking and loss chunking as configured)."""
        assert self.model is not None  # built in configure_model
        doc_ids = None
        if self.hparams["document_masking"]:
            assert self.eos_id is not None  # set in setup from the data module's tokenizer
            doc_ids = document_ids(inputs, self.eos_id)
        return self.model(
            inputs, doc_ids, targets=targets, loss_chunk_tokens=self.loss_chunk_tokens(targets.numel())
        )

    def loss_chunk_tokens(self, n_tokens: int) -> int | None:
        """The loss chunk for a micro-batch of `n_tokens` tokens: the configured one, or under "auto"
        the automatic choice, said in one line the first time it chunks a micro-batch size."""
        setting = self.hparams["loss_chunk_tokens"]
        if setting != "auto":
            return setting
        if n_tokens not in self._auto_chunks:
            chunk = self._auto_chunks[n_tokens] = auto_chunk_tokens(n_tokens, self.config.vocab_size)
            if chunk is not None and (self._attached_trainer() is None or self.trainer.is_global_zero):
                logits = f"{n_tokens:,} tokens x {self.config.vocab_size:,} vocabulary"
                print(
                    f"model.loss_chunk_tokens auto: cross-entropy {chunk} tokens at a time (logits of a "
                    f"micro-batch: {logits}, more than 2^23)",
                    file=sys.stderr,
                )
        return self._auto_chunks[n_tokens]

    def on_validation_epoch_end(self) -> None:
        """Token-weighted mean loss per source over all ranks, and its perplexity."""
        for source, loss in self._val_sums.means(self.sum_over_ranks).items():
            self.log(f"val/{source}/loss", loss, add_dataloader_idx=False, rank_zero_only=True)
            self.log(f"val/{source}/ppl", torch.exp(loss), add_dataloader_idx=False, rank_zero_only=True)

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")
