"""Training: `pretrain fit` over a LightningModule and a LightningDataModule.

- `fit`: LightningCLI over the two (recipe -> Trainer), resume, the divergence loop;
- `module`: `PretrainModule`, the training step (loss, clipping, the spike guard's verdict);
- `datamodule`: `PretrainDataModule`, the shard reader positioned by the global step;
- `schedules`: LR schedules as pure functions of the step;
- `parallelize`: FSDP2, activation checkpointing, compile;
- `evaluation`: validation loss per data source over all ranks;
- `spike_guard`: bad steps, new loss levels and divergences; `rollback`: what follows a divergence;
- `signals`: the stop/requeue flag SIGUSR1/SIGTERM set (installed before torch is imported);
- `private_apis`: every private Lightning API used, in one place;
- `callbacks/`: checkpoints, requeue, monitoring, progress, EMA/LaWA, downstream benchmarks.

Which hook runs when, what each callback does at the optimizer-step boundary and what a
checkpoint holds: docs/training-step.md.
"""
