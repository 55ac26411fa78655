"""The training data order: permutations, exact mixtures, exactly-once epochs, resume, world sizes."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import write_dataset
from torch.utils.data import DataLoader

from pretrain.data.loader import build_train_dataset, build_val_datasets, data_fingerprint
from pretrain.data.mixture import Mixture
from pretrain.data.permutation import Permutation
from pretrain.errors import UserError

SEQ = 8
B, M = 8, 2  # global batch, micro batch (samples)
WINDOWS = 96  # windows per epoch of the main synthetic source: 12 steps


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    assert sorted(Permutation(n, "key")(np.arange(n)).tolist()) == list(range(n))


def test_permutation_shuffles_and_depends_on_key():
    n = 10_000
    a = Permutation(n, "1/a/0")(np.arange(n))
    assert not np.array_equal(a, Permutation(n, "1/a/1")(np.arange(n)))
    assert np.abs(np.diff(a)).mean() > n / 4  # neighbours scatter (n/3 expected for a random order)
    assert (a == np.arange(n)).sum() < 10  # about 1 fixed point expected
    assert Permutation(n, "1/a/0")(np.array([4321]))[0] == a[4321]  # pointwise == vectorized


def _prefix_deviation(mixture: Mixture, periods: int = 2) -> list[np.ndarray]:
    """Per source, D * (count - share * n) for every prefix length n (exact integers)."""
    n = periods * mixture.period
    source, counter = mixture.assign(np.arange(n))
    out = []
    for s, c in enumerate(mixture.counts):
        mine = source == s
        assert np.array_equal(counter[mine], np.arange(mine.sum()))  # each source counts 0, 1, 2, ...
        counts = np.concatenate([[0], np.cumsum(mine)])
        out.append(counts * mixture.period - c * np.arange(n + 1))
    return out


@pytest.mark.parametrize(
    "weights",
    [(0.693584, 0.306416), (0.95, 0.05), (0.995, 0.005), (0.5, 0.5), (1, 2), (0.75, 0.25), (0.123, 0.877)],
)
def test_two_sources_within_one_over_every_window(weights):
    mixture = Mixture(weights)
    exact = [Fraction(str(w)) / sum(Fraction(str(v)) for v in weights) for w in weights]
    assert [Fraction(int(c), mixture.period) for c in mixture.counts] == exact
    for deviation in _prefix_deviation(mixture):
        # Any window [a, b) deviates by (d(b) - d(a)) / D, so max - min <= D means within 1.
        assert deviation.max() - deviation.min() <= mixture.period


def test_many_sources_within_tijdeman_bound():
    rng = np.random.default_rng(0)
    for _ in range(40):
        k = int(rng.integers(3, 7))
        weights = rng.integers(1, 200, size=k).tolist()
        mixture = Mixture(weights)
        bound = Fraction(1) - Fraction(1, 2 * k - 2)
        for deviation in _prefix_deviation(mixture):
            assert np.abs(deviation).max() <= bound * mixture.period  # every prefix within d < 1
            assert deviation.max() - deviation.min() < 2 * mixture.period  # every window within 2


def test_mixture_is_pure_in_the_index():
    mixture = Mixture((0.693584, 0.306416))
    i = np.array([0, 17, 62_499, 62_500, 10**12 + 3])
    source, counter = mixture.assign(i)
    again, later = mixture.assign(i + 5 * mixture.period)
    assert np.array_equal(source, again)
    assert np.array_equal(later - counter, 5 * mixture.counts[source])
    assert mixture.consumed(10**12).sum() == 10**12


@pytest.fixture
def one_source(tmp_path):
    # 96 windows over three uneven shards (one of a single token) and a 5-token tail to drop.
    total = WINDOWS * SEQ + 1 + 5
    return {"a": (write_dataset(tmp_path / "a", [300, 1, total - 301]), 1.0)}


def global_order(sources, world_size, workers, steps, start_step=0, seed=3):
    """First token of each global sample in [start_step*B, (start_step+steps)*B), read rank by rank."""
    out = np.full((steps, B), -1, dtype=np.int64)
    per_rank = B // world_size
    accumulation = per_rank // M
    for rank in range(world_size):
        dataset = build_train_dataset(
            sources,
            seq_len=SEQ,
            global_batch_size=B,
            micro_batch_size=M,
            seed=seed,
            rank=rank,
            world_size=world_size,
            start_sample=start_step * B,
        )
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        for q, (x, y) in enumerate(itertools.islice(loader, steps * accumulation)):
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (M, SEQ)
            assert torch.equal(y[:, :-1], x[:, 1:])  # labels are the inputs shifted by one
            step, inner = divmod(q, accumulation)
            first = rank * per_rank + inner * M
            out[step, first : first + M] = x[:, 0].numpy()
    assert (out >= 0).all()
    return out.ravel()


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_window_exactly_once_per_epoch(one_source, world_size, workers):
    order = global_order(one_source, world_size, workers, steps=3 * WINDOWS // B)
    x = order // SEQ
    assert (order % SEQ == 0).all()  # windows start at multiples of seq_len (stride seq_len)
    epochs = x.reshape(3, WINDOWS)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(WINDOWS))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # The same global order whatever the world size and worker count.
    assert np.array_equal(order, global_order(one_source, 1, 0, steps=3 * WINDOWS // B))


def test_windows_hold_consecutive_tokens_across_shards(one_source):
    dataset = build_train_dataset(one_source, seq_len=SEQ, global_batch_size=B, micro_batch_size=M, seed=3)
    for x, y in itertools.islice(iter(dataset), WINDOWS // M):
        full = torch.cat([x, y[:, -1:]], dim=1)
        assert torch.equal(full - full[:, :1], torch.arange(SEQ + 1).expand(M, -1))


@pytest.mark.parametrize("start_step", [1, 5, 11, 12, 17])
def test_resume_equals_continuing(one_source, start_step):
    full = global_order(one_source, 1, 0, steps=24)
    resumed = global_order(one_source, 2, 2, steps=4, start_step=start_step)
    assert np.array_equal(resumed, full[start_step * B : (start_step + 4) * B])
    on_four = global_order(one_source, 4, 0, steps=4, start_step=start_step)
    assert np.array_equal(on_four, resumed)


@pytest.mark.parametrize("start", [1, 37, 250, 1001])
def test_order_from_any_sample_index_equals_continuing(start):
    """The order is a pure function of the global sample index: starting at any k (not only at a
    step boundary, where the loader resumes) gives what a run from 0 sees from k on, mixtures
    with a cycling tiny source included."""
    from pretrain.data.order import SampleOrder

    order = SampleOrder(["big", "tiny"], [96, 3], Mixture([0.9, 0.1]), seed=3)
    full = order.locate(np.arange(start + 200))
    resumed = order.locate(np.arange(start, start + 200))
    for a, b in zip(resumed, full, strict=True):
        assert np.array_equal(a, b[start:])


def test_seed_changes_the_order(one_source):
    assert not np.array_equal(
        global_order(one_source, 1, 0, 12, seed=3), global_order(one_source, 1, 0, 12, seed=4)
    )


def test_mixture_shares_and_a_tiny_source_cycles(tmp_path):
    sources = {
        "big": (write_dataset(tmp_path / "big", [200 * SEQ + 1]), 0.9),
        "tiny": (write_dataset(tmp_path / "tiny", [3 * SEQ + 1], offset=10**6), 0.1),
    }
    steps = 60
    order = global_order(sources, 2, 2, steps)
    tiny = order >= 10**6
    n = len(order)
    counts = np.concatenate([[0], np.cumsum(tiny)])
    for length in range(1, n + 1):  # every window of consecutive samples
        window_counts = counts[length:] - counts[:-length]
        assert np.abs(window_counts - 0.1 * length).max() <= 1 + 1e-9
    tiny_windows = (order[tiny] - 10**6) // SEQ
    epochs = tiny_windows[: len(tiny_windows) // 3 * 3].reshape(-1, 3)
    assert len(epochs) >= 15  # the tiny source went round many times...
    assert all(sorted(e) == [0, 1, 2] for e in epochs.tolist())  # ...each time exactly once per window
    assert len({tuple(e) for e in epochs.tolist()}) > 1  # in a fresh order each epoch
    big_windows = order[~tiny] // SEQ
    assert sorted(big_windows[:200].tolist()) == list(range(200))
    dataset = build_train_dataset(sources, seq_len=SEQ, global_batch_size=B, micro_batch_size=M)
    epochs_done = dataset.epochs(steps * B)
    assert epochs_done["tiny"] == pytest.approx(tiny.sum() / 3) and epochs_done["big"] == pytest.approx(
        (~tiny).sum() / 200
    )


def test_validation_order_is_fixed_and_split_over_ranks(tmp_path):
    root = write_dataset(tmp_path / "v", [50 * SEQ + 1], val_sizes=(20 * SEQ, 21 * SEQ + 4))  # 41 val windows
    sources = {"v": (root, 1.0)}

    def read(world_size, workers, max_samples=None):
        seen = []
        for rank in range(world_size):
            val = build_val_datasets(
                sources,
                seq_len=SEQ,
                micro_batch_size=M,
                rank=rank,
                world_size=world_size,
                max_samples=max_samples,
            )["v"]
            batches = list(DataLoader(val, batch_size=None, num_workers=workers))
            assert len(batches) == len(val)
            seen.append(torch.cat([x[:, 0] for x, _ in batches]))
        return seen

    one = read(1, 0)[0]
    assert len(one) == 40  # 41 windows cut to a multiple of world size x micro batch
    first_val_token = 50 * SEQ + 1
    assert len(set(((one - first_val_token) // SEQ).tolist())) == 40
    assert torch.equal(one, read(1, 2)[0])  # workers do not change the order
    two = read(2, 2)
    assert len(two[0]) == len(two[1]) == 20  # every rank runs the same number of batches
    assert sorted(torch.cat(two).tolist()) == sorted(one.tolist())
    assert torch.equal(read(1, 0, max_samples=9)[0], one[:8])  # a cap takes a prefix of the fixed order


def test_refuses_mixed_tokenizers_and_damaged_data(tmp_path):
    a = write_dataset(tmp_path / "a", [100], tokenizer="tok-A")
    b = write_dataset(tmp_path / "b", [100], tokenizer="tok-B")
    kwargs = dict(seq_len=SEQ, global_batch_size=B, micro_batch_size=M)
    with pytest.raises(UserError, match="different tokenizers"):
        build_train_dataset({"a": (a, 0.5), "b": (b, 0.5)}, **kwargs)
    with pytest.raises(UserError, match="not enough for one window"):
        build_train_dataset({"a": (a, 1.0)}, seq_len=100, global_batch_size=B, micro_batch_size=M)
    with pytest.raises(UserError, match="multiple of the global batch"):
        build_train_dataset({"a": (a, 1.0)}, start_sample=3, **kwargs)
    with pytest.raises(UserError, match="not a multiple of world size"):
        build_train_dataset({"a": (a, 1.0)}, seq_len=SEQ, global_batch_size=6, micro_batch_size=4)
    with open(a / "train/shard_00000.bin", "r+b") as f:
        f.truncate(40)  # a shard that no longer matches the manifest
    with pytest.raises(UserError, match="shard_00000.bin: 40 bytes"):
        build_train_dataset({"a": (a, 1.0)}, **kwargs)
    (b / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a prepared dataset"):
        build_train_dataset({"b": (b, 1.0)}, **kwargs)


def test_data_fingerprint_tracks_content_and_weights(tmp_path):
    a = write_dataset(tmp_path / "a", [100, 50])
    b = write_dataset(tmp_path / "b", [100, 50])
    fp = data_fingerprint({"x": (a, 1.0)})
    assert fp == data_fingerprint({"x": (b, 1.0)})  # identical content, other place
    assert fp != data_fingerprint({"x": (a, 2.0)})
    assert fp != data_fingerprint({"y": (a, 1.0)})
    assert fp != data_fingerprint({"x": (write_dataset(tmp_path / "c", [100, 50], offset=1), 1.0)})


def test_training_path_needs_no_preparation_packages(tmp_path):
    """The GPU machines have no `datasets`: reading must not import it (nor tokenizers, pyarrow)."""
    import subprocess
    import sys
    from pathlib import Path

    root = write_dataset(tmp_path / "a", [20 * SEQ + 1], val_sizes=(4 * SEQ + 1,))
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "tokenizers", "pyarrow", "zstandard"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from pretrain.data.loader import build_train_dataset, build_val_datasets, data_fingerprint
sources = {{"a": ({str(root)!r}, 1.0)}}
x, y = next(iter(build_train_dataset(sources, seq_len={SEQ}, global_batch_size=2, micro_batch_size=2)))
assert x.shape == (2, {SEQ})
assert len(build_val_datasets(sources, seq_len={SEQ}, micro_batch_size=2)["a"]) == 2
assert data_fingerprint(sources)
"""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
