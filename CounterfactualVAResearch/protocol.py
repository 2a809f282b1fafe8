"""One command per evaluation protocol: data, training of every model, evaluation, table, figure.

`counterfactualva protocol CONFIG.json [--out DIR]` reads a protocol file (see ``benchmarks/protocols/``):

    {
      "name": "...", "scale": "paper" | "reduced",
      "data": {"kind": "synthetic" | "phantom", ...generator arguments...},
      "preprocessing": {...model grid, as `counterfactualva train`...},
      "training": {...TrainingConfig defaults for every model: val_every, checkpoint_every, seed...},
      "models": {"<name>": {"method": "...", "steps": N, "config": {...}, "batch_size": B, "seed": S}},
      "judge": "<model name>",                       # the independent classifier (validity, perturbation)
      "rows": [{"label": "VANT-GAN", "model": "<name>", "options": {...}, "paper": {"dice": 95.5, "iou": 91.4}},
               {"label": "VANT-GAN, untrained", "model": "<name>", "untrained": true},
               {"label": "constant map", "constant": true},
               {"label": "normative z-score", "normative": true},   # vs the normal training subjects
               {"label": "population truth (oracle)", "population_truth": true}],  # mean training truth
      "medxgan": {"model": "<name>", "images": 8, "runs": 3, "inversion_steps": 500},
      "targets": {"rows": {"VANT-GAN": {"dice": 95.5, "iou": 91.4}}, "ncc_above": [[...], [...]], "validity_min": 0.9,
                  "ncc_min": {"VANT-GAN": 0.5}, "judge_accuracy_min": 0.9,
                  "validity_rows": ["VANT-GAN", "ICAM"],        # validity_min asked of these rows only (default: all trained)
                  "dice_above": [["medXGAN"], ["Grad-CAM"]],    # paper-rule Dice ordering
                  "medxgan_cosine_min": 0.9},                   # medXGAN inversion convergence (needs "medxgan")
      "examples": 4
    }

A model's ``config`` may name another model's file as ``"@<name>"`` (medXGAN's frozen classifier). Every stage
is restartable: data and finished models are reused, an interrupted training resumes from its checkpoint.
Outputs in the run folder: ``results.json``, ``results.md`` (table with the paper's figures and the targets
checked), ``examples.png`` (input, ground truth and every row's map for a few test images), ``models/``.
Model selection is the training loop's validation metric; the test split is only read here.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from CounterfactualVALib.atomic import atomic_path
from CounterfactualVALib.checkpoint import read_metadata, save_model
from CounterfactualVALib.devices import select_device
from CounterfactualVALib.methods import create_method, load_method
from CounterfactualVALib.preprocessing import PreprocessingConfig
from CounterfactualVALib.run_files import CHECKPOINT_NAME, MODEL_NAME

from .evaluation import (
    evaluate,
    evaluate_constant,
    evaluate_normative,
    evaluate_population_truth,
    judge_accuracy,
    format_table,
    load_judge,
    load_split,
    perturbation_drop,
    write_results,
)
from .method_checks import lig_ig_ratio, medxgan_convergence

#: written beside a model when its training has run to its end: the mark of a model a rerun may reuse
TIMING_NAME = "protocol_timing.json"
SECTIONS = {"name", "scale", "description", "data", "preprocessing", "training", "models", "judge", "rows", "medxgan", "targets", "examples", "evaluate"}


def read_protocol(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Protocol file {path} does not exist; the shipped ones are in benchmarks/protocols/.")
    protocol = json.loads(path.read_text())
    unknown = set(protocol) - SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown protocol sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    for key in ("data", "preprocessing", "models", "rows"):
        if key not in protocol:
            raise ValueError(f"{path}: the protocol has no {key!r} section.")
    for row in protocol["rows"]:
        if not _model_free(row) and row.get("model") not in protocol["models"]:
            raise ValueError(f"{path}: row {row.get('label')!r} names model {row.get('model')!r}, which the 'models' section does not define.")
    if protocol.get("judge") and protocol["judge"] not in protocol["models"]:
        raise ValueError(f"{path}: judge {protocol['judge']!r} is not one of the models.")
    return protocol


MODEL_FREE_ROWS = {"constant": evaluate_constant, "normative": evaluate_normative, "population_truth": evaluate_population_truth}


def _model_free(row: dict) -> str | None:
    """The key of a reference row that needs no model (constant map, normative z-score, population truth)."""
    return next((key for key in MODEL_FREE_ROWS if row.get(key)), None)


def _log(message: str) -> None:
    print(f"[protocol] {message}", flush=True)


def generate_data(spec: dict, out: Path) -> Path:
    csv_path = out / "data" / "cohort.csv"
    if csv_path.is_file():
        return csv_path
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "synthetic":
        from .data.synthetic import generate_synthetic

        return Path(generate_synthetic(out / "data", **spec))
    if kind == "phantom":
        from .data.phantom import generate_phantom_cohort

        return Path(generate_phantom_cohort(out / "data", **spec))
    raise ValueError(f"data kind must be 'synthetic' or 'phantom', got {kind!r}")


def _resolve_references(config: dict, model_files: dict) -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, str) and value.startswith("@"):
            name = value[1:]
            if name not in model_files:
                raise ValueError(f"configuration {key}={value}: model {name!r} must be listed (and trained) before the model that uses it.")
            value = str(model_files[name])
        out[key] = value
    return out


def _references(config: dict) -> list[str]:
    return [v[1:] for v in config.values() if isinstance(v, str) and v.startswith("@")]


def _train_one(name: str, spec: dict, protocol: dict, csv_path: Path, out: Path, device: str, files: dict) -> None:
    """Train one model of the protocol (resuming an interrupted run); its wall time is kept beside it."""
    from CounterfactualVATrainingLib.loop import TrainingConfig, train

    run_dir = out / "models" / name
    started = time.perf_counter()
    settings = {**protocol.get("training", {}), **spec.get("training", {}), **({"seed": spec["seed"]} if "seed" in spec else {})}
    _log(f"{name}: training {spec['method']} for {spec['steps']} steps"
         + (f" or {settings['time_budget_minutes']:g} min" if settings.get("time_budget_minutes") else ""))
    config = TrainingConfig(
        method=spec["method"],
        data=str(csv_path),
        out=str(run_dir),
        preprocessing={**protocol["preprocessing"], **spec.get("preprocessing", {})},
        method_config=_resolve_references(spec.get("config", {}), files),
        steps=int(spec["steps"]),
        batch_size=spec.get("batch_size"),
        patch_size=spec.get("patch_size"),
        device=device,
        resume=(run_dir / CHECKPOINT_NAME).is_file(),
        overwrite=not (run_dir / CHECKPOINT_NAME).is_file(),  # a start that never checkpointed is moved aside
        command=f"counterfactualva protocol (model {name})",
        # every model of a protocol (and a rerun) reads the cohort's preprocessed arrays from one place
        **{"cache_dir": str(csv_path.parent / "cache"), **settings},
    )
    if train(config, should_stop=lambda: _STOP_REQUESTED) is None:
        raise RuntimeError(f"training of {name} stopped; run the same protocol command again to resume.")
    # wall time kept beside the model, so a rerun that reuses the model still reports it
    (run_dir / TIMING_NAME).write_text(json.dumps({"wall_s": round(time.perf_counter() - started, 1)}))


def _finished(model_file: Path) -> bool:
    """A model whose training ran to its end (steps or time budget). The loop also writes model.safetensors at
    every better validation, so that file alone may be an interrupted run's snapshot, which must be resumed."""
    return model_file.is_file() and (model_file.parent / TIMING_NAME).is_file()


#: set in a worker process by a SIGTERM that arrives while it is not training (caching, between models)
_STOP_REQUESTED = False


def _start_worker(threads: int) -> None:
    """A side-by-side training worker: its share of the cores, and a SIGTERM that stops what it does cleanly
    (the training installs its own handler while it runs; outside it the request is kept for the next one)."""
    import signal

    def keep_request(signum, frame):
        global _STOP_REQUESTED
        _STOP_REQUESTED = True

    signal.signal(signal.SIGTERM, keep_request)
    _share_cores(threads)


def _share_cores(threads: int) -> None:
    """Each of the side-by-side trainings gets its share of the cores: torch's default (all cores per
    process) oversubscribes them, and 2 jobs x 2 threads on 2 cores ran 2-4x slower per step than 2 x 1."""
    import torch

    torch.set_num_threads(threads)


class ProtocolStopped(RuntimeError):
    """SIGTERM or Ctrl-C while models trained side by side: each training checkpointed; rerun to resume."""


@contextlib.contextmanager
def _stop_workers_when_stopped(pool, running: dict):
    """The side-by-side trainings run in worker processes of their own, which a signal to this process does not
    reach: killing a protocol once left its trainings running, unseen, beside the rerun. Here SIGTERM and Ctrl-C
    stop every worker's training at its next step (the training checkpoints, as on its own SIGTERM), wait for
    them, and end with ProtocolStopped."""
    import signal
    import threading

    def stop(signum, frame):
        raise ProtocolStopped(f"the protocol was stopped (signal {signum}); every training checkpointed: run the same command again to resume.")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        yield
    except (ProtocolStopped, KeyboardInterrupt) as exc:
        from concurrent.futures import wait

        for future in running:
            future.cancel()  # not started yet: never starts
        for worker in list(getattr(pool, "_processes", {}).values()):  # the executor has no public handle on them
            if worker.is_alive():
                worker.terminate()  # SIGTERM: a training checkpoints and stops at its next step (_start_worker)
        wait(list(running))  # each ends with "training stopped", its checkpoint written
        pool.shutdown(wait=True)
        if isinstance(exc, KeyboardInterrupt):
            raise ProtocolStopped("the protocol was interrupted (Ctrl-C); every training checkpointed: run the same command again to resume.") from None
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def train_models(protocol: dict, csv_path: Path, out: Path, device: str, jobs: int = 1) -> tuple[dict, dict]:
    """Train (or reuse) every model, `jobs` of them side by side (a model that names another as "@name"
    waits for it); returns ({name: model file}, {name: training summary})."""
    specs = protocol["models"]
    files = {name: out / "models" / name / MODEL_NAME for name in specs}
    pending = []
    for name in specs:
        if _finished(files[name]):
            _log(f"{name}: reusing {files[name]}")
        else:
            pending.append(name)
    if jobs <= 1:
        for name in pending:
            _train_one(name, specs[name], protocol, csv_path, out, device, files)
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(threads,)
        ) as pool:
            running = {}
            with _stop_workers_when_stopped(pool, running):  # signals reach the workers' trainings
                while pending or running:
                    for name in list(pending):
                        ready = all(_finished(files[d]) for d in _references(specs[name].get("config", {})))
                        if ready and len(running) < jobs:
                            running[pool.submit(_train_one, name, specs[name], protocol, csv_path, out, device, files)] = name
                            pending.remove(name)
                    if not running:
                        raise ValueError(f"models {pending} name models that are not in the protocol or cannot be trained first.")
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        running.pop(future)
                        future.result()  # a failed training stops the protocol with its own error
    summaries = {}
    for name, spec in specs.items():
        timing_file = files[name].parent / TIMING_NAME
        training = read_metadata(files[name]).training
        log = files[name].parent / "log.csv"
        trained_steps = trained_minutes = None
        if log.is_file():  # the model file records its selected step; the log how far training went
            import csv

            with open(log) as f:
                rows = list(csv.DictReader(f))
            if rows:
                trained_steps = int(rows[-1]["step"])
                if rows[-1].get("elapsed_seconds"):
                    trained_minutes = round(float(rows[-1]["elapsed_seconds"]) / 60, 1)
        summaries[name] = {
            "method": spec["method"],
            "steps": trained_steps or int(spec["steps"]),
            "selected_step": training.get("selected_step"),
            "device": training.get("device"),
            "training_minutes": trained_minutes,
            "wall_s": json.loads(timing_file.read_text())["wall_s"] if timing_file.is_file() else None,
        }
    return files, summaries


def _untrained_copy(model_file: Path, out: Path) -> Path:
    """A random-initialised model of the same architecture (seed 0): the floor a trained model must beat."""
    target = out / "models" / f"{model_file.parent.name}_untrained.safetensors"
    if not target.is_file():
        metadata = read_metadata(model_file)
        torch.manual_seed(0)
        method = create_method(metadata.method, metadata.spatial_dims, metadata.method_config)
        metadata.training = {"note": "untrained: random initialisation, seed 0"}
        save_model(target, method.inference_state_dict(), metadata)
    return target


def evaluate_rows(protocol: dict, files: dict, csv_path: Path, out: Path, device: str) -> list[dict]:
    settings = protocol.get("evaluate", {})
    judge = files.get(protocol.get("judge"))
    results = []
    for row in protocol["rows"]:
        started = time.perf_counter()
        if _model_free(row):
            result = MODEL_FREE_ROWS[_model_free(row)](protocol["preprocessing"], csv_path, limit=settings.get("limit"))
        else:
            model_file = files[row["model"]]
            if row.get("untrained"):
                model_file = _untrained_copy(model_file, out)
            result = evaluate(
                model_file, csv_path, judge_model=judge, device=device, limit=settings.get("limit"),
                options=row.get("options", {}), perturb_fraction=settings.get("perturb_fraction", 0.05),
            )
        result["label"] = row["label"]
        result["paper"] = row.get("paper")
        result["wall_s"] = round(time.perf_counter() - started, 1)
        _log(f"{row['label']}: Dice {100 * result['paper_rule']['dice']:.1f}, NCC {result['paper_rule']['ncc']:.3f} ({result['wall_s']} s)")
        results.append(result)
    return results


def random_perturbation(protocol: dict, files: dict, csv_path: Path, device) -> dict | None:
    if not protocol.get("judge"):
        return None
    settings = protocol.get("evaluate", {})
    config = PreprocessingConfig.from_dict(read_metadata(files[protocol["judge"]]).preprocessing)
    items = load_split(csv_path, config, "test", settings.get("limit"))
    judge = load_judge(files[protocol["judge"]], device)
    return perturbation_drop(judge, items, None, settings.get("perturb_fraction", 0.05), device)


def medxgan_checks(protocol: dict, files: dict, csv_path: Path, device) -> dict | None:
    spec = protocol.get("medxgan")
    if not spec:
        return None
    metadata, method = load_method(files[spec["model"]], device)
    config = PreprocessingConfig.from_dict(metadata.preprocessing)
    inputs = [t[0].to(device) for t in load_split(csv_path, config, "test", int(spec.get("images", 8)))]
    steps = int(spec.get("inversion_steps", 500))
    started = time.perf_counter()
    result = {
        "convergence": medxgan_convergence(method, inputs, int(spec.get("runs", 3)), steps),
        "lig_ig": lig_ig_ratio(method, inputs, steps, int(spec.get("ig_steps", 50))),
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def check_targets(protocol: dict, results: list[dict], judge: dict | None = None, medxgan: dict | None = None) -> list[dict]:
    """Each target as {"target", "measured", "met"}. Validity targets are only checked with a judge that
    reaches `judge_accuracy_min` itself."""
    targets = protocol.get("targets", {})
    by_label = {r["label"]: r for r in results}
    checks = []
    for label, minimum in targets.get("ncc_min", {}).items():
        measured = by_label[label]["paper_rule"]["ncc"]
        checks.append({"target": f"{label} NCC >= {minimum}", "measured": round(measured, 3), "met": measured >= minimum})
    judge_ok = True
    if "judge_accuracy_min" in targets and judge is not None:
        judge_ok = judge["accuracy"] >= targets["judge_accuracy_min"]
        checks.append({"target": f"judge test accuracy >= {100 * targets['judge_accuracy_min']:.0f}% (else validity is not reported)",
                       "measured": f"{100 * judge['accuracy']:.0f}%", "met": judge_ok})
    for label, wanted in targets.get("rows", {}).items():
        for metric, minimum in wanted.items():
            measured = 100 * by_label[label]["paper_rule"][metric]
            checks.append({"target": f"{label} {metric} >= {minimum}", "measured": round(measured, 1), "met": measured >= minimum})
    for metric, scale, digits in (("ncc", 1, 3), ("dice", 100, 1)):
        # "ncc_above" / "dice_above": [rows that must score higher, rows they must beat]
        if f"{metric}_above" in targets:
            above, below = targets[f"{metric}_above"]
            lowest = min(by_label[a]["paper_rule"][metric] for a in above)
            highest = max(by_label[b]["paper_rule"][metric] for b in below)
            name = "NCC" if metric == "ncc" else "Dice"
            checks.append({
                "target": f"{name} of every one of {', '.join(above)} above every one of {', '.join(below)}",
                "measured": f"lowest {scale * lowest:.{digits}f} vs highest {scale * highest:.{digits}f}",
                "met": lowest > highest,
            })
    if "medxgan_cosine_min" in targets and medxgan:
        cosine = medxgan["convergence"]["cosine_mean"]
        checks.append({"target": f"medXGAN inversion convergence cosine >= {targets['medxgan_cosine_min']}", "measured": round(cosine, 3),
                       "met": cosine >= targets["medxgan_cosine_min"]})
    if "validity_min" in targets and judge_ok:
        asked = targets.get("validity_rows")
        for r in results:
            share = r.get("validity", {}).get("counterfactuals_called_normal")
            if share is not None and not r["label"].endswith("untrained") and (asked is None or r["label"] in asked):
                checks.append({"target": f"{r['label']}: counterfactuals called normal >= {100 * targets['validity_min']:.0f}%", "measured": f"{100 * share:.0f}%", "met": share >= targets["validity_min"]})
    return checks


def save_examples(protocol: dict, results: list[dict], files: dict, csv_path: Path, path: Path, n: int) -> None:
    """Like vant-gan Figure 3: rows = test images; columns = input, ground truth, each trained row's |map|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.get("_maps") and not r["label"].endswith("untrained")]
    if not shown:
        return
    config = PreprocessingConfig.from_dict(read_metadata(Path(shown[0]["model"])).preprocessing)
    items = load_split(csv_path, config, "test", n)
    cols = 2 + len(shown)
    fig, axes = plt.subplots(len(items), cols, figsize=(1.9 * cols, 1.9 * len(items)), squeeze=False)

    def plane(volume, index):
        return volume if volume.ndim == 2 else volume[index]

    for i, (image, truth, _, _) in enumerate(items):
        image = image[0, 0].numpy()
        index = int(np.argmax(np.abs(truth).reshape(truth.shape[0], -1).sum(1))) if truth.ndim == 3 else 0
        panels = [("input", plane(image, index), "gray", None), ("ground truth", plane(np.abs(truth), index), "magma", None)]
        panels += [(r["label"], plane(np.abs(r["_maps"][i]), index), "magma", None) for r in shown]
        for j, (title, data, cmap, _) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(data, cmap=cmap, origin="lower", interpolation="nearest")
            ax.axis("off")
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"{protocol['name']}: |map| per method (test images)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _hardware(device, jobs: int = 1) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = f"{torch.get_num_threads()} torch threads"
    if jobs > 1:  # the trainings ran side by side, each on its share of the cores (_share_cores)
        threads = f"{jobs} trainings side by side with {max(1, (os.cpu_count() or 1) // jobs)} torch thread(s) each"
    return f"CPU ({os.cpu_count()} cores, {threads}, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def write_report(protocol: dict, report: dict, path: Path) -> None:
    lines = [f"# {protocol['name']}", "", f"Scale: **{protocol.get('scale', 'paper')}**. {protocol.get('description', '')}".rstrip(), ""]
    lines += [f"Hardware: {report['hardware']}; wall time of this protocol run {report['wall_s'] / 60:.1f} min (models reused from an earlier run are not counted: see the training table).", ""]
    lines += ["| row | n | Dice | IoU | NCC | Dice (val thr) | IoU (val thr) | CF called normal | perturbation drop | paper Dice / IoU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        v = r.get("validation_threshold", {})
        validity = r.get("validity", {}).get("counterfactuals_called_normal")
        paper = r.get("paper") or {}
        lines.append(
            f"| {r['label']} | {r['n']} | {100 * r['paper_rule']['dice']:.1f} | {100 * r['paper_rule']['iou']:.1f} | {r['paper_rule']['ncc']:.3f} | "
            + (f"{100 * v['dice']:.1f} | {100 * v['iou']:.1f} | " if v else "- | - | ")
            + (f"{100 * validity:.0f}% | " if validity is not None else "- | ")
            + (f"{r['perturbation']['mean_drop']:.3f} | " if "perturbation" in r else "- | ")
            + (f"{paper.get('dice', '-')} / {paper.get('iou', '-')} |" if paper else "- |")
        )
    if report.get("judge"):
        j = report["judge"]
        lines += ["", f"Judge (independent classifier): test accuracy {100 * j['accuracy']:.0f}% over {j['n']} subjects (mean P(abnormal): abnormal {j['mean_p_abnormal']['abnormal']:.2f}, normal {j['mean_p_abnormal']['normal']:.2f})."]
    if report.get("random_perturbation"):
        rp = report["random_perturbation"]
        lines += ["", f"Perturbation reference: the same number of random head voxels ({100 * rp['fraction']:.0f}%) lowers P(abnormal) by {rp['mean_drop']:.3f} (judge's mean P(abnormal) before: {rp['mean_p_before']:.3f})."]
    if report.get("medxgan"):
        m = report["medxgan"]
        c, g = m["convergence"], m["lig_ig"]
        lines += ["", f"medXGAN inversion convergence ({c['runs']} random restarts x {c['images']} test images, {c['inversion_steps']} steps): cosine {c['cosine_mean']:.3f} +/- {c['cosine_std']:.3f}, SSIM {c['ssim_mean']:.3f} +/- {c['ssim_std']:.3f} (paper, MRI, 10,000 steps: 0.965 +/- 0.008, 0.970 +/- 0.020).",
                  f"medXGAN LIG/IG attributed-voxel ratio ({g['images']} images, tolerance {g['tolerance']} x max): {g['ratio_mean']:.2f} +/- {g['ratio_std']:.2f} (paper: 0.21 +/- 0.09)."]
    if report["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
    lines += ["", "| model | method | steps trained | best validation step | training minutes | training wall time (s) |", "|---|---|---|---|---|---|"]
    for name, s in report["training"].items():
        minutes = s.get("training_minutes")
        lines.append(f"| {name} | {s['method']} | {s['steps']} | {s['selected_step'] or '-'} | {minutes if minutes is not None else '-'} | {s['wall_s'] if s['wall_s'] is not None else '-'} |")
    lines += ["", "Dice and IoU in %, paper rule (|map| >= 0.5 max|map|); NCC = Pearson r of |map| and |ground truth|; val thr = threshold fraction chosen on the validation split; CF called normal = share of the test patients' counterfactuals the independent judge classifies normal; perturbation drop = mean drop of the judge's P(abnormal) when the top voxels by |map| are set to the image mean.", ""]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))


def run_protocol(config_path, out=None, device: str = "auto", jobs: int = 1) -> dict:
    protocol = read_protocol(config_path)
    out = Path(out or Path("runs") / Path(config_path).stem)
    out.mkdir(parents=True, exist_ok=True)
    torch_device, _ = select_device(device)
    started = time.perf_counter()
    _log(f"{protocol['name']} -> {out}")
    csv_path = generate_data(protocol["data"], out)
    files, training = train_models(protocol, csv_path, out, device, jobs)
    results = evaluate_rows(protocol, files, csv_path, out, device)
    report = {
        "protocol": protocol,
        "hardware": _hardware(torch_device, jobs),
        "training": training,
        "results": results,
        "random_perturbation": random_perturbation(protocol, files, csv_path, torch_device),
        "medxgan": medxgan_checks(protocol, files, csv_path, torch_device),
    }
    if protocol.get("judge"):
        report["judge"] = judge_accuracy(files[protocol["judge"]], csv_path, "test", torch_device, protocol.get("evaluate", {}).get("limit"))
        minimum = protocol.get("targets", {}).get("judge_accuracy_min")
        if minimum is not None and report["judge"]["accuracy"] < minimum:
            for r in results:  # a judge that cannot tell the classes apart measures nothing about counterfactuals
                r.pop("validity", None)
                r.pop("perturbation", None)
    report["targets"] = check_targets(protocol, results, report.get("judge"), report.get("medxgan"))
    if protocol.get("examples", 4):
        save_examples(protocol, results, files, csv_path, out / "examples.png", int(protocol.get("examples", 4)))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_results(report, out / "results.json")
    write_report(protocol, report, out / "results.md")
    print(format_table(results))
    _log(f"results: {out / 'results.md'}")
    return report
