"""Training: the LightningModule, data module, LR schedules, checkpoints, monitoring and `pretrain fit`."""
