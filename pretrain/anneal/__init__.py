"""Anneal probes: decay branches from a constant-phase run's checkpoints (`RUN_DIR/anneal/step-N/`),
what each scored, and a forecast fitted to them (docs/anneal-probes.md)."""
