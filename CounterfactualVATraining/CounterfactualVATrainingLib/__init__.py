"""CounterfactualVA training library: MONAI data pipeline and the shared training loop
(AMP, atomic checkpoints, resume, logs, progress, cancel, DDP) that drives every method's training step."""
