"""The files of a run folder (``counterfactualva train --out``), named once: the training loop writes them,
the Slicer training support and the protocol read them. No torch here (the Slicer GUI process imports it)."""

CHECKPOINT_NAME = "checkpoint.pt"  # the full training state, for --resume
MODEL_NAME = "model.safetensors"  # the model file of the best validated step
LOG_NAME = "log.csv"  # one row per logged step: losses, validation metrics, timing
TENSORBOARD_FOLDER = "tensorboard"
