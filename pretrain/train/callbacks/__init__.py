"""Lightning callbacks of a `pretrain fit` run: what happens around the training step.

- `step_callback`: `StepCallback`, the base that tells callbacks "an optimizer step just finished";
- `periodic_checkpoint`: checkpoints on a cadence, never half-written, pruned to the last K;
- `checkpoint_writer`: its asynchronous writes (a staged copy written in the background);
- `requeue`: on SIGUSR1/SIGTERM, a checkpoint at the next step boundary and a SLURM requeue;
- `monitor`: per-step metrics (tokens, LR, epochs, tokens/s, MFU, memory);
- `goodput`: where the launch's wall time goes (`RUN_DIR/goodput/launch-<k>.json`);
- `profiler`: a torch profiler trace of optimizer steps A:B, only when asked (`--profile.steps`);
- `progress_bar`: a progress bar counted in optimizer steps;
- `final_validation`: validate after the last step when it is not already a validation step;
- `downstream`: lm-eval benchmarks on the weights being trained, every N steps;
- `weight_copies`: the base of the weight copies kept beside training, used by
- `ema`: an exponential moving average of the weights, and
- `lawa`: the online average of the latest spaced copies (LaWA).

`pretrain fit` adds the checkpoint, requeue, monitor, goodput, progress bar, final validation and
(when asked) profiler callbacks itself; a recipe adds the others under `trainer.callbacks`.
"""
