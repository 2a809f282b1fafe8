"""`counterfactualva` command line: attribute, train, generate, evaluate, protocol, methods, info.

The Slicer module runs `python -m CounterfactualVACLI attribute ... --progress` in a subprocess and
reads `PROGRESS <fraction> <stage>` lines from stdout. Every failure, bad input or bug alike, ends with
exit code 2 and one last stderr line `ERROR: <what> — <fix>` (:func:`main` is the one error boundary); the
traceback goes to `counterfactualva-error.log` in the output folder when it exists (for a bug without one:
the temporary folder; the ERROR line names the file), and to the terminal with --debug.
Ctrl-C ends with exit code 130, and a training run stopped by a signal with exit code 3.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

ERROR_LOG_NAME = "counterfactualva-error.log"
EXIT_FAILURE = 2
EXIT_INTERRUPTED = 130


def _progress_printer(enabled: bool):
    def report(fraction: float, stage: str) -> None:
        if enabled:
            print(f"PROGRESS {fraction:.3f} {stage}", flush=True)
        else:
            print(f"[{fraction * 100:5.1f}%] {stage}", file=sys.stderr, flush=True)

    return report


def _key_values(pairs: list[str] | None) -> dict:
    """`key=value` pairs; values parsed as JSON when they parse (numbers, booleans, lists), else strings."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_attribute(args) -> int:
    from CounterfactualVALib.inference import run_attribution
    from CounterfactualVALib.metrics import check_threshold

    check_threshold(args.threshold_rule, args.threshold_value)  # before the model and the scan are read

    summary = run_attribution(
        args.model,
        args.input,
        args.out,
        device=args.device,
        threshold_rule=args.threshold_rule,
        threshold_value=args.threshold_value,
        method_options=_key_values(args.option),
        file_ext=args.format,
        figure=not args.no_figure,
        progress=_progress_printer(args.progress),
    )
    out = Path(args.out)
    files = summary.outputs
    print(f"Wrote {', '.join(str(out / f) for f in [files.counterfactual, files.attribution, files.mask] if f)}", file=sys.stderr)
    print(f"Timings (s, in-process): {json.dumps(summary.timings_s)}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from CounterfactualVATrainingLib.loop import TrainingConfig, train

    preprocessing = {
        "spatial_dims": args.spatial_dims,
        "size": args.size,
        "spacing": args.spacing,
        "crop": args.crop,
        "intensity": args.intensity,
    }
    if args.spatial_dims == 3:
        preprocessing["orientation"] = args.orientation
    config = TrainingConfig(
        method=args.method,
        data=args.data,
        out=args.out,
        preprocessing=preprocessing,
        method_config=_key_values(args.config),
        steps=args.steps,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        augmentation=args.augmentation,
        time_budget_minutes=args.time_budget,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        resume=args.resume,
        overwrite=args.overwrite,
        num_workers=args.num_workers,
        cache_dir=args.cache_dir,
        select_on=args.select_on,
        command=shlex.join(["counterfactualva"] + sys.argv[1:]),
    )
    report = _progress_printer(args.progress)

    def progress(step, total, row):
        if args.progress:
            losses = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith(("loss", "val_")))
            report(step / total, f"step {step}/{total} {losses}")

    model = train(config, progress=progress)
    if model is None:
        print(f"Training stopped; continue with the same command plus --resume (checkpoint in {args.out}).", file=sys.stderr)
        return 3
    print(f"Model written to {model}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    if args.kind == "synthetic":
        from CounterfactualVAResearch.data.synthetic import generate_synthetic

        csv_path = generate_synthetic(args.out, n=args.n, size=args.size, spatial_dims=args.spatial_dims, seed=args.seed, shape=args.shape)
    else:
        from CounterfactualVAResearch.data.phantom import generate_phantom_cohort

        csv_path = generate_phantom_cohort(
            args.out, n_subjects=args.n, spacing_mm=args.spacing, effect_size=args.effect_size, seed=args.seed,
            oblique_degrees=args.oblique_degrees, recipe=args.recipe,
        )
    print(csv_path)
    return 0


def cmd_evaluate(args) -> int:
    from CounterfactualVAResearch.evaluation import evaluate, format_table, write_results

    results = [
        evaluate(model, args.data, split=args.split, judge_model=args.judge, device=args.device, limit=args.limit, options=_key_values(args.option))
        for model in args.model
    ]
    print(format_table(results))
    if args.out:
        write_results(results, args.out)
    return 0


def cmd_protocol(args) -> int:
    from CounterfactualVAResearch.protocol import ProtocolStopped, run_protocol

    try:
        run_protocol(args.config, out=args.out, device=args.device, jobs=args.jobs)
    except ProtocolStopped as stopped:
        print(f"{stopped}", file=sys.stderr, flush=True)
        return 3  # as a stopped training: resumable, not a failure
    return 0


def cmd_methods(args) -> int:
    """Each registered method's attribution options and training configuration keys, from its declarations."""
    from CounterfactualVALib.methods import available_methods, get_method_class

    names = args.method or available_methods()
    for name in names:
        cls = get_method_class(name)
        print(f"{name}: {cls.title or cls.__name__}")
        print("  attribute options (--option KEY=VALUE):")
        for spec in cls.options or ():
            print(f"    {spec.describe()}")
        if not cls.options:
            print("    (none)")
        print("  training configuration (train --config KEY=VALUE):")
        for spec in cls.config_schema:
            print(f"    {spec.describe()}")
        if cls.training_defaults:
            print(f"  training defaults: {json.dumps(cls.training_defaults)}")
        print()
    return 0


def cmd_info(args) -> int:
    from CounterfactualVALib.checkpoint import read_metadata

    print(json.dumps(read_metadata(args.model).to_dict(), indent=2))
    return 0


class UsageError(ValueError):
    """A command line argparse refuses (unknown option, bad choice, missing argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised to :func:`main`'s boundary instead of exiting from inside parsing."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} — see `{self.prog} --help` for the accepted arguments.")


def build_parser() -> argparse.ArgumentParser:
    from CounterfactualVALib.devices import DEVICES
    from CounterfactualVALib.methods import available_methods
    from CounterfactualVALib.metrics import THRESHOLD_RULES
    from CounterfactualVALib.preprocessing import CROPS, INTENSITIES
    from CounterfactualVATrainingLib.augmentation import AUGMENTATIONS

    methods = available_methods()
    parser = _Parser(prog="counterfactualva", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure on the terminal too (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attribute", help="explain a scan: counterfactual, signed map, mask, figure, summary")
    p.add_argument("--model", required=True, help="model file (.safetensors) written by `counterfactualva train`")
    p.add_argument("--input", required=True, help="scan (NIfTI .nii/.nii.gz or NRRD .nrrd)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threshold-rule", default="paper", choices=tuple(THRESHOLD_RULES))
    p.add_argument("--threshold-value", type=float, default=None, help="fraction of max (paper: 0.5), percentile (99), or absolute value")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. samples=20 (repeatable)")
    p.add_argument("--format", default=None, choices=[".nii.gz", ".nii", ".nrrd"], help="output format (default: the input's)")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--progress", action="store_true", help="machine-readable PROGRESS lines on stdout")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser(
        "train", help="train a model on a cohort CSV (path,label[,mask,subtype,split])",
        epilog="`counterfactualva methods` lists each method's configuration keys (--config) with defaults and ranges.",
    )
    p.add_argument("--method", required=True, choices=methods, help="one of: %(choices)s")
    p.add_argument("--data", required=True, help="cohort CSV")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.csv, tensorboard/, model.safetensors")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes of training with the best validated model "
                        "(--steps stays the upper bound and the length of the learning-rate schedule)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None,
                   help="train on patches of this size (x y [z]) cropped at one position in both classes; "
                        "fully convolutional methods only (e.g. vantgan with --config generator=unet)")
    p.add_argument("--augmentation", default="none", choices=AUGMENTATIONS,
                   help="anatomy: a new head size, pose, intensity bias and contrast for every training image of "
                        "every step (no flips, which would move a lateralised effect); geometry: head size and pose "
                        "only; none: the images as cached")
    p.add_argument("--spatial-dims", type=int, default=3, choices=[2, 3])
    p.add_argument("--size", type=int, nargs="+", default=[64, 64, 64], help="model grid size (x y [z])")
    p.add_argument("--spacing", type=float, nargs="+", default=[3.0, 3.0, 3.0], help="model grid spacing in mm")
    p.add_argument("--orientation", default="RAS")
    p.add_argument("--crop", default="foreground", choices=CROPS)
    p.add_argument("--intensity", default="percentile", choices=INTENSITIES)
    p.add_argument("--config", action="append", metavar="KEY=VALUE", help="method hyper-parameter, e.g. ngf=32 (repeatable)")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--no-amp", action="store_true", help="train in fp32 on CUDA (default: bf16 autocast)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds a run: its files are moved to <out>/replaced-<time>/, never deleted")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--select-on", default="map", choices=["map", "accuracy"],
                   help="what picks the exported step at validation: the map against the ground truth (default), or "
                        "classification accuracy (classifiers: a judge for counterfactual validity)")
    p.add_argument("--cache-dir", default=None,
                   help="keep every subject's preprocessed arrays in this folder, so that the next run on the same "
                        "cohort and grid skips preprocessing (files are re-read when they change)")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="write a synthetic or MNI152 phantom cohort (images + CSV)")
    p.add_argument("kind", choices=["synthetic", "phantom"])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000, help="images (synthetic) or subjects (phantom)")
    p.add_argument("--size", type=int, default=128, help="synthetic image side")
    p.add_argument("--spatial-dims", type=int, default=2, choices=[2, 3])
    p.add_argument("--shape", default="box", choices=["box", "circle"])
    p.add_argument("--spacing", type=float, default=2.0, help="phantom spacing in mm")
    p.add_argument("--effect-size", type=float, default=0.5)
    p.add_argument("--recipe", default=None, choices=["varied"],
                   help="phantom: 'varied' draws atrophy sites (hippocampi, ventricles, cortical patches), strengths, "
                        "deformation, head size, bias and noise per subject (default: the fixed recipe)")
    p.add_argument("--oblique-degrees", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="Dice/IoU/NCC against ground truth and counterfactual validity on a held-out split")
    p.add_argument("--model", required=True, nargs="+", help="one or more model files")
    p.add_argument("--data", required=True, help="cohort CSV with split and mask columns")
    p.add_argument("--split", default="test")
    p.add_argument("--judge", default=None, help="independent classifier model file for counterfactual validity")
    p.add_argument("--limit", type=int, default=None, help="at most this many subjects per split")
    p.add_argument("--option", action="append", metavar="KEY=VALUE")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("protocol", help="run an evaluation protocol end to end: data, training, evaluation, table, figure")
    p.add_argument("config", help="protocol file (JSON), e.g. benchmarks/protocols/synthetic_reduced.json")
    p.add_argument("--out", default=None, help="run folder (default: runs/<protocol file name>); finished stages are reused")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--jobs", type=int, default=1, help="train this many models side by side (e.g. 2 on two CPU cores, one torch thread each)")
    p.set_defaults(func=cmd_protocol)

    p = sub.add_parser("methods", help="list the methods with their attribute options and training configuration keys")
    p.add_argument("method", nargs="*", help=f"only these methods (default: all of {', '.join(methods)})")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("info", help="print a model file's metadata (no weights are loaded)")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line's one error boundary: a failure of any kind ends with exit code 2 and a last line
    `ERROR: <what> — <fix>` on stderr, its traceback in the output folder's error log (and on the terminal
    with --debug), never a bare traceback as the last line (the Slicer module shows that line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("COUNTERFACTUALVA_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt as exc:
        _finish_with_error(args, argv, exc, debug, "interrupted (Ctrl-C) — run the command again (a training run continues with --resume).")
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # --help, or a library calling sys.exit
        if exc.code in (0, None):
            raise
        _finish_with_error(args, argv, exc, debug, f"stopped with exit status {exc.code!r} — see the messages above.")
        return EXIT_FAILURE
    except BaseException as exc:  # noqa: BLE001 - the boundary: nothing may escape as a traceback
        _finish_with_error(args, argv, exc, debug)
        return EXIT_FAILURE


def _is_user_error(exc: BaseException) -> bool:
    """Bad input, refused arguments and the environment (disk, permissions): not bugs."""
    from CounterfactualVALib.imageio import InputError

    return isinstance(exc, (InputError, UsageError, ValueError, OSError, KeyboardInterrupt, SystemExit))


def error_message(exc: BaseException, args=None, log_path=None) -> str:
    """`<what> — <fix>` for any exception, on one line."""
    from CounterfactualVALib.imageio import InputError

    text = " ".join(str(exc).split())
    system_error = isinstance(exc, OSError) and exc.errno is not None  # raised by the OS, not by our checks
    if not system_error and (isinstance(exc, (InputError, UsageError)) or (isinstance(exc, (ValueError, OSError)) and text)):
        if " — " in text:
            return text
        what, sep, fix = text.partition(". ")
        if sep and fix:
            return f"{what} — {fix}"
        return f"{text.rstrip('.')} — check the command's arguments (`counterfactualva {getattr(args, 'command', '') or ''} --help`)."
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            f"out of memory ({type(exc).__name__}: {text[:200]}) — use --device cpu for GPU memory, a smaller grid or batch, "
            "or close other programs."
        )
    if system_error:
        where = exc.filename or getattr(args, "out", None) or "the file"
        reason = exc.strerror or text
        fixes = {
            errno.ENOSPC: "free some disk space or choose another --out.",
            errno.EACCES: "choose a folder you can write to, or fix its permissions.",
            errno.EROFS: "choose a writable folder for --out.",
            errno.EEXIST: "choose another --out, or remove that file.",
            errno.ENOTDIR: "--out must name a folder (or a path that does not exist yet), not a file.",
            errno.EISDIR: "pass a file, not a folder.",
        }
        return f"{reason}: {where} — {fixes.get(exc.errno, 'check the path and that the disk is healthy, then run again.')}"
    return (
        f"internal error in CounterfactualVA ({type(exc).__name__}: {text[:300] or 'no message'}) — this is a bug: "
        f"please report it with the traceback in {log_path or 'the error log'} (rerun with --debug to print it here)."
    )


def _error_log_path(args) -> Path | None:
    """`<out>/counterfactualva-error.log` when the command's output folder exists (it is never created for
    the log: a refused or failed start leaves no folder behind)."""
    out = getattr(args, "out", None)
    if not out:
        return None
    folder = Path(out)
    if getattr(args, "command", None) == "evaluate":  # its --out is a JSON file
        folder = folder.parent
    return folder / ERROR_LOG_NAME if folder.is_dir() else None


def _finish_with_error(args, argv: list[str], exc: BaseException, debug: bool, message: str | None = None) -> None:
    """Log the traceback, then print the one ERROR line (last, after everything else was flushed)."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    unexpected = not _is_user_error(exc)
    path = _error_log_path(args) if args is not None else None
    if path is None and unexpected:  # a bug's traceback is always kept somewhere
        path = Path(tempfile.gettempdir()) / f"counterfactualva-error-{os.getpid()}.log"
    message = " ".join((message or error_message(exc, args, path)).split())
    if path is not None:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"$ counterfactualva {shlex.join(argv)}\n{trace}\nERROR: {message}\n\n")
        except OSError:
            path = None
    sys.stdout.flush()
    if debug:
        print(trace, file=sys.stderr, end="")
    print(f"ERROR: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
