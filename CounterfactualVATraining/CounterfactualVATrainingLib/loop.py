"""The one training loop every method runs on.

It owns what is common: data, device and precision (bf16 autocast + channels-last on CUDA), DDP under
`torchrun` (parameters broadcast from rank 0, gradients averaged across ranks), learning-rate schedules and
exact resume. What happens around the steps (validation against ground truth on held-out subjects, the model
file of the best step, checkpoints, logs, progress, cancel, time budget) is done by handlers
(:mod:`.handlers`), with one teardown whatever ends the run. Methods provide their networks, `training_step`
and, when their networks depend on the model grid, `prepare_config`; the loop names no method.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from CounterfactualVALib.atomic import atomic_path
from CounterfactualVALib.checkpoint import ModelMetadata, save_model
from CounterfactualVALib.metrics import map_scores
from CounterfactualVALib.methods import TrainingContext, create_method, get_method_class
from CounterfactualVALib.preprocessing import PreprocessingConfig, head_mask_on_grid
from CounterfactualVALib.run_files import CHECKPOINT_NAME, MODEL_NAME

from . import distributed
from .augmentation import make_augmentation
from .data import UnpairedSampler, cache_split, describe, load_cohort, step_generator
from .handlers import Handler, default_handlers
from .runfolder import RunFolder


@dataclass
class TrainingConfig:
    method: str
    data: str
    out: str
    preprocessing: dict = field(default_factory=dict)
    method_config: dict = field(default_factory=dict)
    steps: int = 1000
    #: stop after this many minutes of training (wall clock, this process; a resumed run adds its earlier
    #: time) with the best validated model; `steps` stays the upper bound and the length the LR schedule
    #: is laid out over. None: no time limit.
    time_budget_minutes: float | None = None
    batch_size: int | None = None
    #: train on patches of this size (x, y[, z], like the grid size) cropped at the same position in both
    #: domains; None trains on whole volumes. Only for methods whose networks are fully convolutional.
    patch_size: list | None = None
    #: training-time augmentation (`augmentation.AUGMENTATIONS`): "anatomy" draws a new head size, pose,
    #: intensity bias and contrast for every image of every step (no flips); "geometry" head size and pose
    #: only; "none" shows the cached images
    augmentation: str = "none"
    val_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    max_val_subjects: int = 32
    #: what picks the exported step: "map" (the map's NCC with the ground truth, or the normal subjects' mean
    #: |map| without one) or "accuracy" (the validation subjects' classification accuracy: for a judge
    #: classifier, which must tell the classes apart; methods that predict a class only)
    select_on: str = "map"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    resume: bool = False
    overwrite: bool = False  # move a run already in `out` aside (runfolder.move_run_aside) instead of refusing
    num_workers: int = 0
    #: folder that keeps every subject's model-grid arrays between runs (data.cache_split); None: memory only
    cache_dir: str | None = None
    classes: list = field(default_factory=lambda: ["normal", "abnormal"])
    command: str = ""


class Trainer:
    """One training run. Handlers read (and may set) ``step``, ``is_last_step``, ``elapsed_s``, ``best``,
    ``validated``, ``status`` (texts shown next to the progress bar), ``dist``, ``out``, ``config``,
    ``val_data`` and call ``validate``, ``export_model`` and ``save_checkpoint``."""

    def __init__(
        self,
        config: TrainingConfig,
        progress: Callable[[int, int, dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        handlers: list[Handler] | None = None,
    ):
        self.config = config
        self.handlers = handlers if handlers is not None else default_handlers(config, progress, should_stop)
        self.out = Path(config.out)
        self.dist = distributed.setup()
        self.device = self._device()
        self.preprocessing = PreprocessingConfig(**config.preprocessing)
        method_class = get_method_class(config.method)
        if config.select_on not in ("map", "accuracy"):
            raise ValueError(f"select_on must be 'map' or 'accuracy', got {config.select_on!r}.")
        if config.select_on == "accuracy" and not hasattr(method_class, "probability"):
            raise ValueError(f"select_on='accuracy': {config.method} predicts no class; use select_on='map' (the default).")
        self.batch_size = config.batch_size or method_class.training_defaults.get("batch_size", 1)
        # networks sized by the model grid (e.g. ICAM's latent classifier) must exist before DDP broadcasts them
        method_config = method_class.prepare_config(dict(config.method_config), self.preprocessing)
        torch.manual_seed(config.seed)  # initial weights depend on the seed only (rank 0's are broadcast under DDP)
        self.method = create_method(config.method, self.preprocessing.spatial_dims, method_config, training=True)
        self.channels_last = self.device.type == "cuda" and config.channels_last
        memory_format = None
        if self.channels_last:
            memory_format = torch.channels_last_3d if self.preprocessing.spatial_dims == 3 else torch.channels_last
        self.memory_format = memory_format
        self.method.to(self.device, memory_format)
        distributed.broadcast_parameters(self.method.networks, self.dist)
        optimizers = self.method.configure_optimizers(config.steps)
        self.optimizers = {name: opt for name, (opt, _) in optimizers.items()}
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt, factor) for name, (opt, factor) in optimizers.items() if factor is not None
        }
        amp_dtype = torch.bfloat16 if (config.amp and self.device.type == "cuda") else None
        self.ctx = TrainingContext(self.device, self.optimizers, amp_dtype, all_reduce=distributed.gradient_averager(self.dist))
        self.ctx.total_steps = config.steps
        self.step = 0
        self.elapsed_s = 0.0  # training wall time so far, including earlier sessions of a resumed run
        self.best = {"score": -math.inf, "step": None, "metrics": {}}
        self.is_last_step = False
        self.validated = False  # whether the current step was a validation step (set by the Validation handler)
        self.status: dict[str, str] = {}

    # --- setup ----------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.dist.enabled and torch.cuda.is_available() and self.config.device != "cpu":
            torch.cuda.set_device(self.dist.local_rank)
            return torch.device("cuda", self.dist.local_rank)
        if self.config.device == "cpu":
            return torch.device("cpu")
        if self.config.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but PyTorch sees no CUDA GPU. Use --device cpu or auto.")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def load_data(self) -> None:
        augmentation = make_augmentation(self.config.augmentation)  # a bad name is refused before minutes of caching
        splits = load_cohort(self.config.data, seed=self.config.seed)
        val_records = splits["val"][: self.config.max_val_subjects * 2]
        # preprocessing every subject once can take minutes: say so, with a bar in a terminal
        show = self.dist.is_main and sys.stderr.isatty()
        if self.dist.is_main:
            print(f"Preparing {len(splits['train'])} training + {len(val_records)} validation subjects "
                  f"(preprocessed once onto the model grid and cached in memory) ...", file=sys.stderr, flush=True)
        self.train_data = cache_split(splits["train"], self.preprocessing, self.config.num_workers, progress=show, cache_dir=self.config.cache_dir)
        self.val_data = cache_split(val_records, self.preprocessing, self.config.num_workers, progress=show, cache_dir=self.config.cache_dir)
        patch = None
        if self.config.patch_size:
            if not getattr(self.method, "supports_patches", False):
                raise ValueError(
                    f"--patch-size: {self.config.method} cannot train on patches (its networks see the whole image); "
                    "leave --patch-size out."
                )
            patch = tuple(reversed(self.config.patch_size))
        self.sampler = UnpairedSampler(self.train_data, self.batch_size, patch, augmentation)
        self.data_summary = describe(self.train_data, self.config.data)

    def _batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.sampler.batch(generator, self.device)
        if self.memory_format is not None:
            batch = {k: v.contiguous(memory_format=self.memory_format) for k, v in batch.items()}
        return batch

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "step": torch.tensor(self.step),
            "networks": {k: v.state_dict() for k, v in self.method.networks.items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "method_state": self.method.training_state(),
            "best_json": json.dumps(self.best),
            "elapsed_s": torch.tensor(self.elapsed_s, dtype=torch.float64),
            "config_json": json.dumps(asdict(self.config)),
        }
        with atomic_path(self.checkpoint_path(), suffix=".pt") as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path()
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}. Start without --resume, or point --out at the run to continue.")
        # weights_only: the unpickler refuses anything but tensors and plain containers.
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(state["config_json"])
        for key in ("method", "preprocessing", "method_config"):
            if saved[key] != asdict(self.config)[key]:
                raise ValueError(f"--resume: the checkpoint was trained with {key}={saved[key]!r}, now {asdict(self.config)[key]!r}. Use the same settings to resume.")
        for k, v in state["networks"].items():
            self.method.networks[k].load_state_dict(v)
        for k, v in state["optimizers"].items():
            self.optimizers[k].load_state_dict(v)
        for k, v in state["schedulers"].items():
            self.schedulers[k].load_state_dict(v)
        self.method.load_training_state(state["method_state"], self.device)
        self.best = json.loads(state["best_json"])
        self.step = int(state["step"])
        self.elapsed_s = float(state["elapsed_s"]) if "elapsed_s" in state else 0.0

    # --- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean NCC/Dice of the map against ground truth on held-out abnormal subjects, and the mean |map| on
        held-out normal subjects (a false-positive measure). The selection score is NCC where ground truth
        exists, otherwise minus the normal subjects' mean |map|. A method that keeps a weight average is
        scored with it, as its model file will be."""
        with self.method.averaged_weights():
            return self._validate()

    def _validate(self) -> dict[str, float]:
        self.method.eval()
        scores: dict[str, list[float]] = {"ncc": [], "dice": [], "iou": [], "normal_abs_map": [], "accuracy": []}
        data = self.val_data
        predicts = hasattr(self.method, "probability")
        for i in range(len(data)):
            x = data.images[i : i + 1].to(self.device)
            if self.memory_format is not None:
                x = x.contiguous(memory_format=self.memory_format)
            with self.ctx.autocast():
                amap = self.method.validation_map(x)
                if predicts:
                    called_abnormal = bool(self.method.probability(x)[0] > 0.5)
                    scores["accuracy"].append(float(called_abnormal == (int(data.labels[i]) == 1)))
            amap = amap.float().cpu().numpy()[0, 0]
            if data.labels[i] == 1 and data.has_mask[i]:
                # scored inside the head for head-cropped models, as the evaluation and the inference mask
                region = head_mask_on_grid(data.images[i, 0].numpy(), self.preprocessing)
                for k, v in map_scores(amap, data.masks[i, 0].numpy(), region=region).items():
                    scores[k].append(v)
            elif data.labels[i] == 0:
                scores["normal_abs_map"].append(float(np.abs(amap).mean()))
        self.method.train()
        metrics = {f"val_{k}": float(np.mean(v)) for k, v in scores.items() if v}
        if self.config.select_on == "accuracy":
            metrics["val_score"] = metrics["val_accuracy"]
        else:
            metrics["val_score"] = metrics.get("val_ncc", -metrics.get("val_normal_abs_map", 0.0))
        return metrics

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        """Run to the last step (or until a handler stops or cancels the run); the model file path, or None
        when cancelled (the checkpoint allows --resume)."""
        # rank 0 holds the run folder (checked, locked, cleaned; a failed start removes what it made) throughout
        folder = RunFolder(self.out).open(resume=self.config.resume, overwrite=self.config.overwrite) if self.dist.is_main else contextlib.nullcontext()
        with folder:
            return self._fit()

    def _fit(self) -> Path | None:
        cfg = self.config
        distributed.barrier(self.dist)
        started: list[Handler] = []
        outcome = "failed"
        try:
            self.load_data()
            if cfg.resume:
                self.load_checkpoint()
            for handler in self.handlers:
                handler.started(self)
                started.append(handler)
            self.method.train()
            outcome = self._run_steps()
            if os.environ.get("CFVA_DEBUG_SYNC"):
                self._report_sync()
        finally:
            for handler in reversed(started):
                handler.finished(self, outcome)
            distributed.cleanup(self.dist)
        return None if outcome == "cancelled" else self.out / MODEL_NAME

    def _run_steps(self) -> str:
        cfg = self.config
        session_start, elapsed_before = time.perf_counter(), self.elapsed_s
        while self.step < cfg.steps:
            if any(handler.cancel_requested(self) for handler in self.handlers):
                return "cancelled"
            t0 = time.perf_counter()
            losses = self._train_one_step()
            self.elapsed_s = elapsed_before + time.perf_counter() - session_start
            stop = [reason for handler in self.handlers if (reason := handler.stop_reason(self))]
            row = {"step": self.step, "step_seconds": time.perf_counter() - t0, "elapsed_seconds": self.elapsed_s, **losses}
            row["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
            self.is_last_step = self.step == cfg.steps or bool(stop)
            for handler in self.handlers:
                handler.step_ended(self, row)
            if stop:
                return "stopped"
        return "completed"

    def _train_one_step(self) -> dict:
        """The method's training step on this step's batch, then the learning-rate schedules; the losses."""
        generator = step_generator(self.config.seed, self.step, self.dist.rank)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
        self.ctx.generator = generator
        self.ctx.step = self.step
        self.ctx.sample_batch = lambda: self._batch(generator)
        losses = self.method.training_step(self._batch(generator), self.ctx)
        self.method.update_averages()
        with warnings.catch_warnings():
            # The schedules follow the global step. A method's warm-up leaves some optimisers idle for its first
            # steps (ICAM's class warm-up leaves its content discriminator's), which torch reports as a scheduler
            # stepped before its optimiser: intended here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
            for scheduler in self.schedulers.values():
                scheduler.step()
        self.step += 1
        return losses

    def _report_sync(self) -> None:
        """Print a digest of this rank's weights (tests check that DDP ranks end identical)."""
        from CounterfactualVALib.checkpoint import weights_digest

        state = {f"{n}.{k}": v for n, net in self.method.networks.items() for k, v in net.state_dict().items()}
        print(f"SYNC rank {self.dist.rank} {weights_digest(state)}", flush=True)

    def export_model(self, path: Path) -> Path:
        cfg = self.config
        metadata = ModelMetadata(
            method=cfg.method,
            method_config=self.method.config,
            preprocessing=self.preprocessing.to_dict(),
            classes=list(cfg.classes),
            normal_class=0,
            networks=list(self.method.inference_networks),
            outputs=list(self.method.outputs),
            training={
                "command": cfg.command,
                "steps": self.step,
                "total_steps": cfg.steps,
                "batch_size": self.batch_size,
                "seed": cfg.seed,
                "data": str(cfg.data),
                "data_summary": self.data_summary,
                "device": str(self.device),
                "world_size": self.dist.world_size,
                "amp": self.ctx.amp_dtype is not None,
                "selected_step": self.best.get("step"),
                "time_budget_minutes": cfg.time_budget_minutes,
                "training_minutes": round(self.elapsed_s / 60.0, 2),
            },
            evaluation={"validation": self.best.get("metrics", {})},
        )
        was_training = self.method.networks.training
        state = {k: v.float() for k, v in self.method.inference_state_dict().items()}
        self.method.networks.train(was_training)
        return save_model(path, state, metadata)


def train(config: TrainingConfig, progress=None, should_stop=None) -> Path | None:
    """Train and return the model file path (None if cancelled; the checkpoint allows --resume)."""
    if not config.command:
        config.command = shlex.join(["counterfactualva"] + sys.argv[1:]) if sys.argv and sys.argv[0] else ""
    # Near-zero-initialised heads (the change-predicting U-Nets start at ~1e-3), their gradients and Adam's
    # second moments can reach denormal floats, which x86 CPUs compute many times slower; flushing them to zero
    # changes nothing a model learns. The setting is process-wide, so it is undone when training ends (a
    # console or test process that trains in-process keeps IEEE behaviour afterwards).
    flushing = torch.set_flush_denormal(True)
    try:
        return Trainer(config, progress, should_stop).fit()
    finally:
        if flushing:
            torch.set_flush_denormal(False)
