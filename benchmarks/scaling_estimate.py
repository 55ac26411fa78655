"""Paper estimate: time, GPU-hours and FSDP2 communication of a pretraining run on N GPUs.

From a measured single-GPU throughput (tokens/s per GPU, `benchmarks/gpu_throughput.py`), the
model's size and the run's batch geometry, for each GPU count: micro-batches per GPU per step,
compute time per step, the bytes each GPU moves per step for two layouts, the time that
communication adds when it cannot hide behind compute, and the link bandwidth below which it
stops hiding. Used for `docs/scaling.md`; the assumptions are the arguments:

- FSDP2 with bf16 parameters (2 bytes) gathered for forward and again for backward
  (reshard after forward), float32 gradients (4 bytes) reduced once per optimizer step
  (`pretrain.train.parallelize`: no reduction on the micro-batches before a step's last).
- "hybrid": shard within a node (NVLink), replicate across nodes; per step a ring all-reduce of each
  GPU's gradient shard across nodes. "full": shard over all GPUs; every gather crosses nodes.
- A micro-batch's gathers hide behind its compute (prefetch); the step's gradient reduction
  hides only behind the last micro-batch's backward (2/3 of its compute).
- Ring collectives: each GPU sends/receives (n-1)/n of the gathered or reduced bytes.
- Per-GPU throughput stays what one GPU measured (no straggler, input or kernel-size effects).

    python benchmarks/scaling_estimate.py --tokens-per-sec 74000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pretrain.model import get_preset
from pretrain.model.flops import count_parameters


@dataclass
class Estimate:
    gpus: int
    micro_batches: int
    micro_batch_size: int
    step_compute_s: float
    intra_gb: float
    inter_gb: float
    exposed_s: float
    threshold_gbps: float

    @property
    def step_s(self) -> float:
        return self.step_compute_s + self.exposed_s


def estimate(args: argparse.Namespace, gpus: int, layout: str, params: int) -> Estimate:
    per_node = min(args.gpus_per_node, gpus)
    nodes = gpus // per_node
    sequences = args.global_batch_tokens // args.seq_len
    micro_batch = min(args.micro_batch_size, sequences // gpus)
    micro_batches = sequences // (gpus * micro_batch)
    micro_s = micro_batch * args.seq_len / args.tokens_per_sec
    gather = 2 * 2 * params  # bf16 parameters, gathered for forward and for backward
    grads = 4 * params  # float32 gradients
    if layout == "hybrid":
        ring = (per_node - 1) / per_node
        intra_per_micro = gather * ring
        intra_step = intra_per_micro * micro_batches + grads * ring
        inter_step = 2 * (nodes - 1) / nodes * grads / per_node if nodes > 1 else 0.0
        gather_s = intra_per_micro / args.nvlink_gbps / 1e9
        reduce_intra_s = grads * ring / args.nvlink_gbps / 1e9
        reduce_s = reduce_intra_s + inter_step / args.internode_gbps / 1e9
        room = 2 / 3 * micro_s - reduce_intra_s
        threshold = inter_step / room / 1e9 if inter_step else 0.0
    else:
        ring = (gpus - 1) / gpus
        link = args.internode_gbps if nodes > 1 else args.nvlink_gbps
        inter_per_micro = gather * ring
        intra_step, inter_step = 0.0, inter_per_micro * micro_batches + grads * ring
        if nodes == 1:
            intra_step, inter_step = inter_step, 0.0
        gather_s = inter_per_micro / link / 1e9
        reduce_s = grads * ring / link / 1e9
        threshold = max(inter_per_micro / micro_s, grads * ring / (2 / 3 * micro_s)) / 1e9
    exposed = micro_batches * max(0.0, gather_s - micro_s) + max(0.0, reduce_s - 2 / 3 * micro_s)
    return Estimate(
        gpus,
        micro_batches,
        micro_batch,
        micro_batches * micro_s,
        intra_step / 1e9,
        inter_step / 1e9,
        exposed,
        threshold,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens-per-sec", type=float, required=True, help="measured per GPU")
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--tokens", type=float, default=3e12)
    parser.add_argument("--global-batch-tokens", type=int, default=2_097_152)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--gpus", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbps", type=float, default=350.0, help="GB/s per GPU within a node")
    parser.add_argument("--internode-gbps", type=float, default=40.0, help="GB/s per GPU across nodes")
    args = parser.parse_args()
    params = count_parameters(get_preset(args.model)).total
    steps = args.tokens / args.global_batch_tokens
    print(
        f"{args.model} ({params:,} parameters), {args.tokens:.3g} tokens = {steps:,.0f} steps of "
        f"{args.global_batch_tokens:,} tokens; {args.tokens_per_sec:,.0f} tokens/s per GPU; NVLink "
        f"{args.nvlink_gbps:g} GB/s, inter-node {args.internode_gbps:g} GB/s per GPU"
    )
    header = (
        "| layout | GPUs | micro-batches x size | step compute s | intra-node GB/GPU/step | "
        "inter-node GB/GPU/step | exposed comm s | step s | hides above GB/s per GPU | days | GPU-hours |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for layout in ("hybrid", "full"):
        for gpus in args.gpus:
            e = estimate(args, gpus, layout, params)
            days = steps * e.step_s / 86400
            print(
                f"| {layout} | {gpus} | {e.micro_batches} x {e.micro_batch_size} | {e.step_compute_s:.2f} | "
                f"{e.intra_gb:.1f} | {e.inter_gb:.2f} | {e.exposed_s:.2f} | {e.step_s:.2f} | "
                f"{e.threshold_gbps:.1f} | {days:.1f} | {days * 24 * gpus:,.0f} |"
            )


if __name__ == "__main__":
    main()
