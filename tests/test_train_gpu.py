"""`pretrain fit` on a CUDA GPU (skipped on CPU-only machines, the only tests allowed to skip in CI).

- bf16-mixed training follows the CPU float32 loss curve of the same recipe: per step within 3%
  of the loss, and within 1% on average over the run.
- Resume after SIGKILL reproduces the per-step losses of an uninterrupted GPU run exactly with
  deterministic settings (`trainer.deterministic`, the SDPA math kernel, cuBLAS workspace config).
- Chunked cross-entropy in bf16 gives the plain loss and uses less peak memory.
"""

from __future__ import annotations

import pytest
import torch
from helpers import STEPS, recipe, require_gpu, run, run_and_kill_after_checkpoint, train_losses

from pretrain.model.loss import linear_cross_entropy

pytestmark = pytest.mark.gpu

GPU_TRAINER = {
    "accelerator": "gpu",
    "devices": 1,
    "max_steps": STEPS,
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}


def test_bf16_on_gpu_follows_the_cpu_float32_loss_curve(tiny_dataset, tmp_path, request):
    require_gpu()
    cpu_losses = request.getfixturevalue("reference")  # after the GPU check: no CPU run on CPU machines
    run_dir = tmp_path / "bf16"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer=GPU_TRAINER | {"precision": "bf16-mixed"})
    run(["fit", "--config", str(config)])
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    relative = [abs(losses[step] - cpu_losses[step]) / cpu_losses[step] for step in cpu_losses]
    assert max(relative) < 0.03, relative
    assert sum(relative) / len(relative) < 0.01, relative


def test_resume_on_gpu_is_exact_with_deterministic_settings(tiny_dataset, tmp_path, monkeypatch):
    require_gpu()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # inherited by the `pretrain` processes
    trainer = GPU_TRAINER | {"precision": "bf16-mixed", "deterministic": True}
    losses = {}
    for name in ("uninterrupted", "killed"):
        run_dir = tmp_path / name
        config = recipe(tmp_path, tiny_dataset, run_dir, trainer=trainer)
        args = ["fit", "--config", str(config), "--model.attention_backend", "sdpa-math"]
        if name == "killed":
            run_and_kill_after_checkpoint(args, run_dir / "checkpoints" / "step-00000004.ckpt")
        run(args)
        losses[name] = train_losses(run_dir)
    assert sorted(losses["killed"]) == list(range(STEPS))
    assert losses["killed"] == losses["uninterrupted"]


def test_chunked_cross_entropy_in_bf16_matches_plain_with_less_memory():
    require_gpu()
    torch.manual_seed(0)
    hidden = torch.randn(8 * 2048, 2048, device="cuda", requires_grad=True)
    weight = (0.02 * torch.randn(32000, 2048, device="cuda")).requires_grad_()
    targets = torch.randint(0, 32000, (8 * 2048,), device="cuda")
    results = {}
    for chunk_tokens in (None, 4096):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - before
        results[chunk_tokens] = (loss.item(), hidden.grad.clone(), weight.grad.clone(), peak)
    (plain_loss, plain_grad, plain_wgrad, plain_peak), (loss, grad, wgrad, peak) = (
        results[None],
        results[4096],
    )
    assert abs(loss - plain_loss) < 1e-3 * plain_loss
    assert (grad - plain_grad).norm() < 2e-2 * plain_grad.norm()
    assert (wgrad - plain_wgrad).norm() < 2e-2 * plain_wgrad.norm()
    assert peak < 0.5 * plain_peak, (peak, plain_peak)
