"""What the training loop does around the steps, one concern per handler.

The loop (:meth:`Trainer.fit <CounterfactualVATrainingLib.loop.Trainer.fit>`) runs the steps and calls, on
every handler in order:

* ``started(trainer)`` once, after the data is loaded and a resumed run restored, before the first step;
* ``cancel_requested(trainer)`` before each step: True ends the run as *cancelled* (checkpoint kept, no model
  written unless one was already selected);
* ``stop_reason(trainer)`` after each step: a text ends the run normally after this step, which then counts as
  the last (validated, exported, checkpointed, logged);
* ``step_ended(trainer, row)`` after each step, with the row of the log (a handler may add columns; later
  handlers see them): ``trainer.is_last_step`` says whether this is the last step;
* ``finished(trainer, outcome)`` once at the end, whatever happened (``outcome``: "completed", "stopped",
  "cancelled" or "failed"), in reverse order, for handlers whose ``started`` ran.

A new concern (a stop condition, a lock on the run folder, another log) is one more handler in
:func:`default_handlers`; the loop does not change.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from typing import Callable

from CounterfactualVALib.run_files import LOG_NAME, MODEL_NAME, TENSORBOARD_FOLDER

from . import distributed
from .runfolder import log_rows_up_to


class Handler:
    """Base class: every hook does nothing."""

    def started(self, trainer) -> None:
        pass

    def cancel_requested(self, trainer) -> bool:
        return False

    def stop_reason(self, trainer) -> str | None:
        return None

    def step_ended(self, trainer, row: dict) -> None:
        pass

    def finished(self, trainer, outcome: str) -> None:
        pass


class StopRequests(Handler):
    """SIGTERM/SIGINT and the caller's `should_stop` end the run at the next step boundary, cancelled."""

    def __init__(self, should_stop: Callable[[], bool] | None = None):
        self.should_stop = should_stop or (lambda: False)
        self.signalled = False
        self.previous: dict = {}

    def started(self, trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.signalled = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, handler)

    def cancel_requested(self, trainer) -> bool:
        return self.signalled or self.should_stop()

    def finished(self, trainer, outcome: str) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class TimeBudget(Handler):
    """Stops after `minutes` of training (a resumed run counts its earlier time), with the best validated model.
    Under DDP rank 0's clock decides, so every rank stops at the same step."""

    def __init__(self, minutes: float):
        self.budget_s = minutes * 60.0
        self.minutes = minutes
        self.reached = False

    def stop_reason(self, trainer) -> str | None:
        self.reached = distributed.agree(trainer.elapsed_s >= self.budget_s, trainer.dist)
        return "time budget" if self.reached else None

    def step_ended(self, trainer, row: dict) -> None:
        trainer.status["budget left"] = f"{max(0.0, self.budget_s - trainer.elapsed_s) / 60:.1f} min"

    def finished(self, trainer, outcome: str) -> None:
        if self.reached and trainer.dist.is_main:
            print(f"Time budget of {self.minutes:g} min reached at step {trainer.step}; "
                  f"best validated step {trainer.best.get('step')}.", file=sys.stderr, flush=True)


class Validation(Handler):
    """Every `every` steps and at the last: the validation metrics into the row, and the best step so far
    (highest ``val_score``) into ``trainer.best``. Without validation subjects the last step is the best."""

    def __init__(self, every: int):
        self.every = every

    def step_ended(self, trainer, row: dict) -> None:
        trainer.validated = trainer.step % self.every == 0 or trainer.is_last_step
        if not trainer.validated or not trainer.dist.is_main:
            return
        if len(trainer.val_data):
            metrics = trainer.validate()
            row.update(metrics)
            if metrics["val_score"] > trainer.best["score"]:
                trainer.best = {"score": metrics["val_score"], "step": trainer.step, "metrics": metrics}
        elif trainer.is_last_step:
            trainer.best = {"score": 0.0, "step": trainer.step, "metrics": {}}


class BestModelExport(Handler):
    """Writes the model file whenever the best step is the current one; the other DDP ranks wait for it."""

    def step_ended(self, trainer, row: dict) -> None:
        if trainer.dist.is_main and trainer.best.get("step") == trainer.step:
            trainer.export_model(trainer.out / MODEL_NAME)
        if trainer.validated:
            distributed.barrier(trainer.dist)


class Checkpoints(Handler):
    """A checkpoint every `every` steps, at the last step, and when the run is cancelled (for --resume)."""

    def __init__(self, every: int):
        self.every = every

    def step_ended(self, trainer, row: dict) -> None:
        if trainer.step % self.every == 0 or trainer.is_last_step:
            trainer.save_checkpoint()

    def finished(self, trainer, outcome: str) -> None:
        if outcome == "cancelled":
            trainer.save_checkpoint()


class LogFile(Handler):
    """The CSV log (and TensorBoard when installed), rank 0 only: every `every` steps, validation steps and the
    last step. A resumed run keeps the rows up to its checkpoint's step and appends to them."""

    def __init__(self, every: int):
        self.every = every
        self.logger = None

    def started(self, trainer) -> None:
        self.logger = _Logger(trainer.out, enabled=trainer.dist.is_main, resume_step=trainer.step if trainer.config.resume else None)

    def step_ended(self, trainer, row: dict) -> None:
        if trainer.step % self.every == 0 or trainer.is_last_step or "val_score" in row:
            self.logger.log(row)

    def finished(self, trainer, outcome: str) -> None:
        if self.logger is not None:
            self.logger.close()


class TerminalProgress(Handler):
    """A progress bar with the losses (and ``trainer.status``) when stderr is a terminal, rank 0 only."""

    def started(self, trainer) -> None:
        from tqdm import tqdm

        enabled = trainer.dist.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=trainer.config.steps, initial=trainer.step, disable=not enabled, desc="training", unit="step")

    def step_ended(self, trainer, row: dict) -> None:
        self.bar.update(1)
        postfix = {k: f"{v:.3g}" for k, v in row.items() if k.startswith("loss")}
        self.bar.set_postfix({**postfix, **trainer.status}, refresh=False)

    def finished(self, trainer, outcome: str) -> None:
        self.bar.close()


class ProgressCallback(Handler):
    """The caller's ``progress(step, total_steps, row)`` after every step (the command line's PROGRESS lines)."""

    def __init__(self, progress: Callable[[int, int, dict], None]):
        self.progress = progress

    def step_ended(self, trainer, row: dict) -> None:
        self.progress(trainer.step, trainer.config.steps, row)


def default_handlers(config, progress=None, should_stop=None) -> list[Handler]:
    """The handlers of a run configured by `config` (a TrainingConfig), in the order they act on a step."""
    handlers: list[Handler] = [StopRequests(should_stop)]
    if config.time_budget_minutes:
        handlers.append(TimeBudget(config.time_budget_minutes))
    handlers += [Validation(config.val_every), BestModelExport(), LogFile(config.log_every), Checkpoints(config.checkpoint_every), TerminalProgress()]
    if progress is not None:
        handlers.append(ProgressCallback(progress))
    return handlers


class _Logger:
    """CSV log (always) and TensorBoard (when installed), written by rank 0 only."""

    def __init__(self, out, enabled: bool, resume_step: int | None = None):
        """`resume_step`: the checkpoint's step when resuming; rows (and TensorBoard events) after it are
        dropped, since the resumed run logs those steps again (after a kill -9, every step appears once)."""
        import csv

        self.enabled = enabled
        self.path = out / LOG_NAME
        self.rows: list[dict] = []
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            self.rows = log_rows_up_to(self.path, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / TENSORBOARD_FOLDER), purge_step=None if resume_step is None else resume_step + 1)
        except Exception:  # tensorboard is optional
            self.writer = None

    def log(self, row: dict) -> None:
        import csv

        from CounterfactualVALib.atomic import atomic_path

        if not self.enabled:
            return
        self.rows.append(row)
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with atomic_path(self.path, suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
