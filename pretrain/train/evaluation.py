"""Validation loss: token-weighted mean cross-entropy per data source, over all ranks.

One accumulator (`LossSums`) serves every evaluation: Lightning's validation loop
(`PretrainModule.validation_step`), the validation of EMA/LaWA weights (`evaluate`, the same
batches run again with other weights swapped in) and offline measurements (benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
SummedLoss = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (inputs, targets) -> loss summed over tokens
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over ranks


class LossSums:
    """Per source: the summed loss and the token count (float64, so that the mean is exact enough)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, source: str, loss_sum: torch.Tensor, tokens: int) -> None:
        sums = self.sums.setdefault(source, torch.zeros(2, device=loss_sum.device, dtype=torch.float64))
        sums += torch.stack([loss_sum.detach().double(), sums.new_tensor(tokens)])

    def means(self, reduce: Reduce | None = None) -> dict[str, torch.Tensor]:
        """Mean loss per source (summed over ranks first with `reduce`), then cleared."""
        losses = {}
        for source, sums in sorted(self.sums.items()):
            total = reduce(sums.clone()) if reduce is not None else sums
            losses[source] = (total[0] / total[1]).float()
        self.sums.clear()
        return losses


@torch.no_grad()
def evaluate(
    summed_loss: SummedLoss,
    batches: Mapping[str, Iterable[Batch]],
    device: torch.device,
    reduce: Reduce | None = None,
) -> dict[str, torch.Tensor]:
    """Mean loss per source of `summed_loss` over each source's batches."""
    sums = LossSums()
    for source, loader in batches.items():
        sums.add(source, torch.zeros((), device=device), 0)  # every rank reduces every source
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            sums.add(source, summed_loss(inputs, targets), targets.numel())
    return sums.means(reduce)
