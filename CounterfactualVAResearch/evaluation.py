"""Evaluation on a held-out split with the papers' protocols.

- Dice and IoU of the thresholded |map| against the ground-truth region (vant-gan 5.1.2), with the paper's
  rule (|map| >= 0.5 max|map|) and with a threshold fraction chosen on the validation split (never the test).
- NCC: Pearson r of |map| with |ground truth| (icam 4.1); for abnormal->normal maps this is ICAM's "-" direction.
- Counterfactual validity (ag-cyclegan Table 2): an independently trained classifier's accuracy on the abnormal
  test images before translation, and the fraction of their counterfactuals it calls normal.
- Perturbation drop (medxgan Table 2): the top `fraction` of head voxels by |map| are replaced by the image's
  mean intensity and the drop of the classifier's P(abnormal) is averaged. The paper perturbs "the salient
  features" without saying how many; a fixed voxel budget makes methods comparable (a mask from each map's own
  threshold would reward large masks), and a random-voxel budget of the same size is the reference.

Checks that belong to one method (medXGAN's inversion convergence and LIG/IG ratio) are in
:mod:`CounterfactualVAResearch.method_checks`.

Maps are compared on the model grid (ground truth resampled with the same preprocessing), which is what the
papers do on their fixed-size images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from CounterfactualVALib.devices import select_device
from CounterfactualVALib.methods import load_method
from CounterfactualVALib.metrics import map_scores
from CounterfactualVALib.preprocessing import PreprocessingConfig, head_mask_on_grid
from CounterfactualVALib.transforms import LoadPreprocessd
from CounterfactualVALib.cohort import read_cohort_csv

FRACTIONS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


# --- data ---------------------------------------------------------------------------------------
def load_items(records, config: PreprocessingConfig, limit: int | None = None):
    """[(image tensor (1, 1, *grid), ground-truth map on the grid (zeros if none), label, head region or None)]
    with the model's preprocessing. The region (head-cropped models only) is where maps are scored."""
    transform = LoadPreprocessd(config)
    items = []
    for record in records[: limit or len(records)]:
        item = transform({"image": record["path"], "mask": record.get("mask") or None})
        image = item["image"]
        items.append((torch.from_numpy(image)[None], item["mask"][0], int(record["label"]), head_mask_on_grid(image[0], config)))
    return items


def abnormal_with_truth(records, split: str):
    return [r for r in records if r.get("split") == split and r["label"] == 1 and r.get("mask")]


def load_split(data_csv, config: PreprocessingConfig, split: str, limit: int | None = None):
    records = read_cohort_csv(data_csv)
    if not any(r.get("split") for r in records):
        # training makes its own train/val split when the column is absent; evaluation needs a held-out one
        raise ValueError(
            f"{data_csv} has no 'split' column (or it is empty on every row), so there is no held-out {split!r} split to evaluate on"
            " — add a split column with train, val or test on each row (`counterfactualva generate` writes one), and train on "
            "the same CSV so that the test subjects are never seen in training."
        )
    items = load_items(abnormal_with_truth(records, split), config, limit)
    if not items and split != "val":
        raise ValueError(
            f"{data_csv} has no abnormal subjects (label 1) with a ground-truth mask in split {split!r}, nothing to evaluate"
            f" — give some rows split={split!r}, label 1 and a mask file, or choose another split with --split."
        )
    return items


# --- maps and scores ----------------------------------------------------------------------------
@torch.no_grad()
def compute_maps(method, items, device, options, batch_size: int = 8):
    maps, counterfactuals = [], []
    for start in range(0, len(items), batch_size):
        x = torch.cat([it[0] for it in items[start : start + batch_size]]).to(device)
        result = method.attribute(x, **options)
        maps += list(result.attribution.float().cpu().numpy()[:, 0])
        cf = result.counterfactual
        counterfactuals += list(cf.float().cpu().numpy()[:, 0]) if cf is not None else [None] * len(x)
    return maps, counterfactuals


def score_maps(maps, items, fraction):
    """Dice/IoU of the |map| >= fraction * max mask and NCC of |map|, per image, inside each item's head region."""
    out = {"dice": [], "iou": [], "ncc": []}
    for amap, (_, truth, _, region) in zip(maps, items):
        for key, value in map_scores(amap, truth, "max-fraction", fraction, region=region).items():
            out[key].append(value)
    return out


def summarize_scores(maps, items, val_maps=None, val_items=None) -> dict:
    """Paper-rule means and standard deviations, plus the validation-chosen threshold applied to the test maps."""
    paper = score_maps(maps, items, 0.5)
    result = {
        "n": len(maps),
        "paper_rule": {k: float(np.mean(v)) for k, v in paper.items()},
        "paper_rule_std": {k: float(np.std(v)) for k, v in paper.items()},
    }
    if val_maps:
        best = max(FRACTIONS, key=lambda f: np.mean(score_maps(val_maps, val_items, f)["dice"]))
        tuned = score_maps(maps, items, best)
        result["validation_threshold"] = {"fraction_of_max": float(best), **{k: float(np.mean(v)) for k, v in tuned.items() if k != "ncc"}}
    return result


# --- classifier-based checks --------------------------------------------------------------------
def load_judge(judge_model, device):
    """The independent classifier network (eval mode, frozen) of a classifier model file."""
    from CounterfactualVALib.methods.classifier import ClassifierBaseline

    return ClassifierBaseline.load_classifier(judge_model, device)


@torch.no_grad()
def _p_abnormal(net, x: torch.Tensor) -> torch.Tensor:
    return net(x).float().softmax(1)[:, 1]


@torch.no_grad()
def counterfactual_validity(judge, inputs, counterfactuals, device) -> dict:
    """Accuracy of an independent classifier on the abnormal inputs, and the share of counterfactuals it calls normal.

    `judge` is a classifier network or the path of a classifier model file.
    """
    net = judge if isinstance(judge, torch.nn.Module) else load_judge(judge, device)
    before = _p_abnormal(net, torch.cat(inputs).to(device))
    out = {"n": len(inputs), "abnormal_inputs_called_abnormal": float((before > 0.5).float().mean())}
    if any(cf is None for cf in counterfactuals):
        out["note"] = "method produces no counterfactual"
        return out
    cf = torch.from_numpy(np.stack(counterfactuals))[:, None].to(device).clamp(-1, 1)
    out["counterfactuals_called_normal"] = float((_p_abnormal(net, cf) <= 0.5).float().mean())
    return out


def perturb_top_voxels(image: np.ndarray, amap: np.ndarray | None, fraction: float, rng: np.random.Generator | None = None, region: np.ndarray | None = None) -> np.ndarray:
    """The image with its top `fraction` of the region's voxels by |map| (random ones if `amap` is None) set to
    the image mean; the region is the head for head-cropped models, else the whole image."""
    candidates = np.flatnonzero(region) if region is not None and region.any() else np.arange(image.size)
    k = max(1, math.ceil(fraction * len(candidates)))
    if amap is None:
        chosen = rng.choice(candidates, size=k, replace=False)
    else:
        scores = np.abs(amap).ravel()[candidates]
        chosen = candidates[np.argsort(-scores, kind="stable")[:k]]
    out = image.copy().ravel()
    out[chosen] = image.mean()
    return out.reshape(image.shape)


@torch.no_grad()
def perturbation_drop(judge, items, maps, fraction: float = 0.05, device="cpu", seed: int = 0) -> dict:
    """Mean drop of the judge's P(abnormal) when the top `fraction` of voxels by |map| become the image mean.

    With `maps=None`, random voxels of the same number are perturbed (the reference a map must beat).
    """
    rng = np.random.default_rng(seed)
    inputs = [it[0] for it in items]
    perturbed = [
        perturb_top_voxels(x[0, 0].numpy(), amap, fraction, rng, region)
        for (x, _, _, region), amap in zip(items, maps if maps is not None else [None] * len(items))
    ]
    before = _p_abnormal(judge, torch.cat(inputs).to(device)).cpu().numpy()
    after = _p_abnormal(judge, torch.from_numpy(np.stack(perturbed))[:, None].float().to(device)).cpu().numpy()
    drop = before - after
    return {"fraction": fraction, "mean_drop": float(drop.mean()), "std_drop": float(drop.std()), "mean_p_before": float(before.mean())}


# --- one model ----------------------------------------------------------------------------------
def evaluate(
    model_path: str | Path,
    data_csv: str | Path,
    split: str = "test",
    judge_model: str | Path | None = None,
    device: str = "auto",
    limit: int | None = None,
    options: dict | None = None,
    perturb_fraction: float | None = 0.05,
) -> dict:
    """Scores of one model on one cohort split (abnormal subjects with ground truth)."""
    torch_device, device_description = select_device(device)
    metadata, method = load_method(model_path, torch_device)
    config = PreprocessingConfig.from_dict(metadata.preprocessing)
    options = options or {}
    test = load_split(data_csv, config, split, limit)
    maps, counterfactuals = compute_maps(method, test, torch_device, options)
    val = load_split(data_csv, config, "val", limit)
    val_maps = compute_maps(method, val, torch_device, options)[0] if val else None
    result = {
        "model": str(model_path),
        "method": metadata.method,
        "options": options,
        "split": split,
        "device": device_description,
        **summarize_scores(maps, test, val_maps, val),
    }
    if judge_model is not None:
        judge = load_judge(judge_model, torch_device)
        inputs = [t[0] for t in test]
        result["validity"] = counterfactual_validity(judge, inputs, counterfactuals, torch_device)
        if perturb_fraction:
            result["perturbation"] = perturbation_drop(judge, test, maps, perturb_fraction, torch_device)
    result["_maps"] = maps  # for figures; dropped by write_results
    return result


def evaluate_constant(preprocessing: dict, data_csv, split: str = "test", limit: int | None = None) -> dict:
    """The constant map's scores: NCC 0, and the paper rule marks the whole grid."""
    config = PreprocessingConfig.from_dict(preprocessing)
    test = load_split(data_csv, config, split, limit)
    maps = [np.ones(t[0].shape[2:], np.float32) for t in test]
    return {"model": None, "method": "constant", "split": split, **summarize_scores(maps, test)}


def normative_maps(preprocessing: dict, data_csv, items, reference_split: str = "train") -> list[np.ndarray]:
    """The normative baseline a neuroimager tries first: each subject's voxel-wise z-score against the normal
    subjects of `reference_split` after the very preprocessing the models use, signed like a counterfactual
    map ((normal mean - subject) / normal std: where the healthy counterpart would be brighter, positive)."""
    config = PreprocessingConfig.from_dict(preprocessing)
    normals = [r for r in read_cohort_csv(data_csv) if r.get("split") == reference_split and r["label"] == 0]
    if len(normals) < 2:
        raise ValueError(f"{data_csv}: the normative baseline needs at least two normal subjects in split {reference_split!r}.")
    reference = np.stack([it[0][0, 0].numpy() for it in load_items(normals, config)])
    mean, std = reference.mean(0), reference.std(0)
    floor = max(float(np.median(std)), 1e-6) * 0.1  # a voxel with no spread (air) must not divide by ~0
    return [(mean - it[0][0, 0].numpy()) / np.maximum(std, floor) for it in items]


def _evaluate_reference_maps(make_maps, name: str, preprocessing: dict, data_csv, split: str, limit: int | None) -> dict:
    """Scores of a model-free reference map `make_maps(preprocessing, data_csv, items)`, with a
    validation-chosen threshold, in the form :func:`evaluate` returns."""
    config = PreprocessingConfig.from_dict(preprocessing)
    test = load_split(data_csv, config, split, limit)
    val = load_split(data_csv, config, "val", limit)
    maps = make_maps(preprocessing, data_csv, test)
    val_maps = make_maps(preprocessing, data_csv, val) if val else None
    return {"model": None, "method": name, "split": split, **summarize_scores(maps, test, val_maps, val), "_maps": maps}


def evaluate_normative(preprocessing: dict, data_csv, split: str = "test", limit: int | None = None) -> dict:
    """Scores of the normative z-score map (:func:`normative_maps`)."""
    return _evaluate_reference_maps(normative_maps, "normative z-score", preprocessing, data_csv, split, limit)


def population_truth_maps(preprocessing: dict, data_csv, items, reference_split: str = "train") -> list[np.ndarray]:
    """An oracle reference, not a method: the mean ground-truth map of the abnormal subjects of
    `reference_split`, given as every subject's map. It scores what a map that knows exactly *where* the
    effect sits in the population, and nothing about the subject, would score; a method above it has
    learnt something about the subject itself, a target above it asks for that."""
    config = PreprocessingConfig.from_dict(preprocessing)
    patients = abnormal_with_truth(read_cohort_csv(data_csv), reference_split)
    if not patients:
        raise ValueError(f"{data_csv}: the population-truth reference needs abnormal subjects with a ground-truth mask in split {reference_split!r}.")
    mean_truth = np.mean([np.asarray(it[1], np.float32) for it in load_items(patients, config)], axis=0)
    return [mean_truth for _ in items]


def evaluate_population_truth(preprocessing: dict, data_csv, split: str = "test", limit: int | None = None) -> dict:
    """Scores of :func:`population_truth_maps`."""
    return _evaluate_reference_maps(population_truth_maps, "population truth (oracle)", preprocessing, data_csv, split, limit)


@torch.no_grad()
def judge_accuracy(judge_model, data_csv, split: str = "test", device="cpu", limit: int | None = None) -> dict:
    """The judge's accuracy on every subject (normal and abnormal) of a split: a judge that cannot tell the
    classes apart measures nothing about counterfactuals."""
    torch_device = device if isinstance(device, torch.device) else select_device(device)[0]
    metadata, _ = load_method(judge_model, torch_device)
    config = PreprocessingConfig.from_dict(metadata.preprocessing)
    records = [r for r in read_cohort_csv(data_csv) if r.get("split") == split]
    items = load_items(records, config, limit)
    net = load_judge(judge_model, torch_device)
    p = _p_abnormal(net, torch.cat([it[0] for it in items]).to(torch_device)).cpu().numpy()
    labels = np.array([it[2] for it in items])
    return {"n": len(items), "accuracy": float(((p > 0.5) == (labels == 1)).mean()),
            "mean_p_abnormal": {"abnormal": float(p[labels == 1].mean()), "normal": float(p[labels == 0].mean())}}


# --- reporting ----------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    header = ["row", "n", "Dice (paper)", "IoU (paper)", "NCC", "Dice (val thr)", "IoU (val thr)", "CF called normal", "perturb drop"]
    rows = []
    for r in results:
        v = r.get("validation_threshold", {})
        validity = r.get("validity", {})
        rows.append([
            r.get("label", r["method"]), r["n"], f"{100 * r['paper_rule']['dice']:.1f}", f"{100 * r['paper_rule']['iou']:.1f}", f"{r['paper_rule']['ncc']:.3f}",
            f"{100 * v['dice']:.1f}" if v else "-", f"{100 * v['iou']:.1f}" if v else "-",
            f"{100 * validity['counterfactuals_called_normal']:.0f}%" if "counterfactuals_called_normal" in validity else "-",
            f"{r['perturbation']['mean_drop']:.3f}" if "perturbation" in r else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def write_results(results, path: str | Path) -> None:
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not k.startswith("_")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    Path(path).write_text(json.dumps(clean(results), indent=2))
