"""`PretrainDataModule`: the shard reader as a LightningDataModule, positioned by the global step.

The training stream is endless (each source walks its own epochs) and positioned by
"global samples consumed" = global_step x global batch size, so a resumed run, even on a
different number of devices with the same global batch, reads exactly what an uninterrupted run
would have read next. Nothing about the data position is stored in checkpoints; what is stored
is the fingerprint of every source (and of the tokenizer), and resuming on data that changed
stops with a clear message unless `allow_data_change` is set.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from torch.utils.data import DataLoader

from pretrain.data.skips import SkipList
from pretrain.errors import UserError
from pretrain.recipe import DEFAULTS, BatchGeometry

if TYPE_CHECKING:
    from pretrain.data.loader import TrainDataset
    from pretrain.data.shards import Manifest


@dataclass
class Source:
    """A prepared dataset (`pretrain data prepare` output directory) and its share of samples."""

    path: str
    weight: float = 1.0


@dataclass
class Ramp:
    """Ramp `source`'s share linearly from `start_share` to its weight's share over the first `tokens`."""

    source: str
    start_share: float
    tokens: int


class PretrainDataModule(L.LightningDataModule):
    """Training mixture and per-source validation over prepared token shards.

    Args:
        sources: name -> Source(path, weight); weights are normalized to shares of samples.
        seq_len: tokens per training sequence (windows of seq_len + 1 tokens).
        global_batch_tokens: tokens per optimizer step over all devices.
        micro_batch_size: sequences per device per forward/backward.
        seed: seeds the per-epoch permutations and the mixture.
        num_workers: DataLoader worker processes per device.
        val_tokens: cap on validation tokens per source (None: the whole validation split).
        allow_data_change: resume even if a source's or the tokenizer's fingerprint changed.
        ramp: optionally ramp one source's share linearly at the start (TinyLlama v1.1 style).
        val_sources: name -> prepared dataset (a path) whose validation split is evaluated and
            logged like the training sources' but never trained on, e.g. the previous stage's data
            in a continual stage without replay, to watch forgetting. Not part of the fingerprint.
        verify_shards: at every launch, check this many shards of each dataset against the checksums
            of its manifest, those the run has checked the fewest times first, so that launches cover
            more and more of the data (`pretrain.data.verify`; 0: none). Token ids are always checked
            against the vocabulary as they are read, and the tokenizer.json beside the shards against
            the manifest's fingerprint at every launch.
    """

    def __init__(
        self,
        sources: dict[str, Source],
        seq_len: int = DEFAULTS["data.seq_len"],
        global_batch_tokens: int = DEFAULTS["data.global_batch_tokens"],
        micro_batch_size: int = DEFAULTS["data.micro_batch_size"],
        seed: int = DEFAULTS["data.seed"],
        num_workers: int = DEFAULTS["data.num_workers"],
        val_tokens: int | None = None,
        allow_data_change: bool = False,
        ramp: Ramp | None = None,
        val_sources: dict[str, str] | None = None,
        verify_shards: int = 2,
    ) -> None:
        super().__init__()
        if not sources:
            raise UserError("data.sources is empty: name at least one prepared dataset")
        BatchGeometry(1, 1, micro_batch_size, seq_len, global_batch_tokens)  # the checks any world needs
        self.sources = {name: s if isinstance(s, Source) else Source(**s) for name, s in sources.items()}
        self.seq_len = seq_len
        self.global_batch_tokens = global_batch_tokens
        self.global_batch_size = global_batch_tokens // seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.val_tokens = val_tokens
        self.allow_data_change = allow_data_change
        if verify_shards < 0:
            raise UserError(f"data.verify_shards must be >= 0 (0: none), got {verify_shards}")
        self.verify_shards = verify_shards
        self.ramp = ramp if ramp is None or isinstance(ramp, Ramp) else Ramp(**ramp)
        self.source_names = list(self.sources)
        self.val_sources = dict(val_sources or {})
        if overlap := sorted(set(self.val_sources) & set(self.sources)):
            raise UserError(
                f"data.val_sources {overlap} are also training sources (validated already): rename or drop them"
            )
        self.val_source_names: list[str] = []
        self.tokenizer_json: str | None = None
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        self.vocab_size: int | None = None
        self.fingerprint: str | None = None
        self.tokenizer_fingerprint: str | None = None
        self.skips = (
            SkipList()
        )  # samples stepped over after rollbacks (set by `pretrain fit`, and checkpoints)
        self._train: TrainDataset | None = None

    def setup(self, stage: str) -> None:
        from pretrain.data.loader import data_fingerprint, open_sources
        from pretrain.data.verify import check_tokenizer

        manifests = open_sources(self.sources | self.val_sources)  # one tokenizer for all, as recorded
        first = next(iter(manifests.values()))
        self.tokenizer_json = check_tokenizer(first)  # the text checked is the text embedded
        self.eos_id, self.vocab_size = first.eos_id, first.vocab_size
        with_bos = all(manifests[name].data["settings"].get("bos") for name in self.sources)
        self.bos_id = first.data["tokenizer"].get("bos_id") if with_bos else None  # BOS before every document
        self.fingerprint = data_fingerprint(self.sources)
        self.tokenizer_fingerprint = first.tokenizer_fingerprint
        if self.verify_shards and (self.trainer is None or self.trainer.is_global_zero):
            self._verify_shards(manifests.values())

    def _verify_shards(self, manifests: Iterable[Manifest]) -> None:
        """Check `verify_shards` shards of each dataset (`pretrain.data.verify`): in the run directory
        of a `pretrain fit` launch (it holds the run's lease), the shards the run has checked least;
        anywhere else (a plain Trainer's working directory) random ones, and nothing is written."""
        from pretrain.data.verify import VerifiedShards, verify
        from pretrain.run_dir import RunDir

        run = RunDir(self.trainer.default_root_dir) if self.trainer is not None else None
        record = VerifiedShards(run.verified_shards) if run and run.lease_file.is_file() else None
        print(verify(manifests, self.verify_shards, show_progress=False, record=record), file=sys.stderr)

    def _check_geometry(self) -> tuple[int, int]:
        """(rank, world size) of this process, once the Trainer's processes split the batch evenly."""
        assert self.trainer is not None  # attached by the Trainer before it asks for a loader
        BatchGeometry(
            self.trainer.num_devices,
            self.trainer.num_nodes,
            self.micro_batch_size,
            self.seq_len,
            self.global_batch_tokens,
        )
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        from pretrain.data.loader import build_train_dataset

        rank, world = self._check_geometry()
        assert self.trainer is not None
        self._train = build_train_dataset(
            self.sources,
            seq_len=self.seq_len,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            start_sample=self.trainer.global_step * self.global_batch_size,
            ramp=self._ramp_in_samples(),
            skips=self.skips,
        )
        return self._loader(self._train)

    def _ramp_in_samples(self) -> dict[str, Any] | None:
        if self.ramp is None:
            return None
        samples = max(self.ramp.tokens // self.seq_len, 1)
        return {"source": self.ramp.source, "start_share": self.ramp.start_share, "samples": samples}

    def val_dataloader(self) -> list[DataLoader]:
        from pretrain.data.loader import build_val_datasets

        rank, world = self._check_geometry()
        max_samples = self.val_tokens // self.seq_len if self.val_tokens else None
        datasets = build_val_datasets(
            self.sources | self.val_sources,
            seq_len=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            rank=rank,
            world_size=world,
            max_samples=max_samples,
        )
        self.val_source_names = list(datasets)
        return [self._loader(d) for d in datasets.values()]

    def _loader(self, dataset: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # the datasets yield whole micro-batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def epochs_at(self, step: int) -> dict[str, float]:
        """Fractional epochs each source has gone through after `step` optimizer steps."""
        if self._train is None:
            return {}
        return self._train.epochs(step * self.global_batch_size)

    def data_identity(self) -> list[Any]:
        """What the training stream is made of (sources' content, weights, tokenizer, ramp): a new
        value means a new stage for the spike guard."""
        return [self.fingerprint, vars(self.ramp) if self.ramp else None]

    def origins(self, first: int, stop: int) -> list[dict[str, Any]]:
        """Source, shard and token offset of the samples at stream positions [first, stop)."""
        assert self._train is not None  # built by train_dataloader
        return self._train.origins(first, stop)

    def state_dict(self) -> dict[str, Any]:
        return {
            "skips": self.skips.to_json(),
            "fingerprint": self.fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "sources": {n: vars(s) for n, s in self.sources.items()},
            "ramp": vars(self.ramp) if self.ramp else None,
            "order": self._order(),
        }

    def _order(self) -> dict[str, int]:
        """What the sample order depends on besides the data: a change breaks the position's meaning."""
        return {"seed": self.seed, "global_batch_tokens": self.global_batch_tokens, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume on data that changed since the checkpoint (unless allowed); take its
        skip list (samples stepped over after rollbacks) into this run's order."""
        self.skips = self.skips.union(SkipList(state.get("skips", [])))
        ramp = vars(self.ramp) if self.ramp else None
        saved_tokenizer = state.get("tokenizer_fingerprint")
        if saved_tokenizer not in (None, self.tokenizer_fingerprint) and not self.allow_data_change:
            raise UserError(
                f"the data is tokenized with another tokenizer than this checkpoint was trained on "
                f"(fingerprint {str(self.tokenizer_fingerprint)[:16]} vs {saved_tokenizer[:16]}): token ids "
                "would change meaning. Prepare the data with the run's original tokenizer.json (or pass "
                "--data.allow_data_change true if this is really meant)"
            )
        saved_order = state.get("order") or {}
        changed = [
            f"data.{k} {saved_order[k]} -> {v}"
            for k, v in self._order().items()
            if saved_order.get(k, v) != v
        ]
        if changed and not self.allow_data_change:
            raise UserError(
                f"the data order changed since this checkpoint was written ({', '.join(changed)}): the resumed "
                "run would not continue its epoch, silently re-reading some samples and skipping others. Restore "
                "the original values, or pass --data.allow_data_change true to continue with the new order"
            )
        if (
            state.get("fingerprint") == self.fingerprint and state.get("ramp") == ramp
        ) or self.allow_data_change:
            return
        raise UserError(
            "the training data changed since this checkpoint was written: "
            f"checkpoint sources {state.get('sources')} (fingerprint {str(state.get('fingerprint'))[:16]}) vs now "
            f"{ {n: vars(s) for n, s in self.sources.items()} } (fingerprint {str(self.fingerprint)[:16]}). "
            "Restore the original data, or pass --data.allow_data_change true to continue on the new data."
        )


def trainer_datamodule(trainer: L.Trainer) -> PretrainDataModule:
    """`trainer.datamodule` of a `pretrain fit` run, typed. Lightning sets the attribute at fit time
    but does not declare it on `Trainer`."""
    return cast(PretrainDataModule, trainer.datamodule)  # type: ignore[attr-defined]
