"""Evaluation on a held-out split with the papers' protocols.

- Dice and IoU of the thresholded |map| against the ground-truth region (vant-gan 5.1.2), with the paper's
  rule (|map| >= 0.5 max|map|) and with a threshold fraction chosen on the validation split (never the test).
- NCC: Pearson r of |map| with |ground truth| (icam 4.1); for abnormal->normal maps this is ICAM's "-" direction.
- Counterfactual validity (ag-cyclegan Table 2): an independently trained classifier's accuracy on the abnormal
  test images before translation, and the fraction of their counterfactuals it calls normal.

Maps are compared on the model grid (ground truth resampled with the same preprocessing), which is what the
papers do on their fixed-size images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data.cohort import read_cohort_csv
from .inference import load_method, select_device
from .metrics import dice, iou, ncc, threshold_map
from .preprocessing import PreprocessingConfig
from .transforms import LoadPreprocessd

FRACTIONS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


def _load_split(records, config: PreprocessingConfig, limit: int | None):
    transform = LoadPreprocessd(config)
    items = []
    for record in records[: limit or len(records)]:
        item = transform({"image": record["path"], "mask": record.get("mask")})
        items.append((torch.from_numpy(item["image"])[None], item["mask"][0], int(record["label"])))
    return items


@torch.no_grad()
def _maps(method, items, device, options, batch_size: int = 8):
    maps, counterfactuals = [], []
    for start in range(0, len(items), batch_size):
        x = torch.cat([it[0] for it in items[start : start + batch_size]]).to(device)
        result = method.attribute(x, **options)
        maps += list(result.attribution.float().cpu().numpy()[:, 0])
        cf = result.counterfactual
        counterfactuals += list(cf.float().cpu().numpy()[:, 0]) if cf is not None else [None] * len(x)
    return maps, counterfactuals


def _scores(maps, truths, fraction):
    out = {"dice": [], "iou": [], "ncc": []}
    for amap, truth in zip(maps, truths):
        truth_mask = np.abs(truth) > 1e-6
        mask, _ = threshold_map(amap, "max-fraction", fraction)
        out["dice"].append(dice(mask, truth_mask))
        out["iou"].append(iou(mask, truth_mask))
        out["ncc"].append(ncc(np.abs(amap), np.abs(truth)))
    return out


def evaluate(
    model_path: str | Path,
    data_csv: str | Path,
    split: str = "test",
    judge_model: str | Path | None = None,
    device: str = "auto",
    limit: int | None = None,
    options: dict | None = None,
) -> dict:
    """Scores of one model on one cohort split (abnormal subjects with ground truth)."""
    torch_device, device_description = select_device(device)
    metadata, method = load_method(model_path, torch_device)
    config = PreprocessingConfig.from_dict(metadata.preprocessing)
    records = read_cohort_csv(data_csv)
    options = options or {}

    def abnormal_with_truth(name):
        return [r for r in records if r.get("split") == name and r["label"] == 1 and r.get("mask")]

    test = _load_split(abnormal_with_truth(split), config, limit)
    if not test:
        raise ValueError(f"{data_csv} has no abnormal subjects with a ground-truth mask in split {split!r}; nothing to evaluate.")
    maps, counterfactuals = _maps(method, test, torch_device, options)
    truths = [t[1] for t in test]
    paper = _scores(maps, truths, 0.5)
    result = {
        "model": str(model_path),
        "method": metadata.method,
        "split": split,
        "n": len(test),
        "device": device_description,
        "paper_rule": {k: float(np.mean(v)) for k, v in paper.items()},
        "paper_rule_std": {k: float(np.std(v)) for k, v in paper.items()},
    }
    val = _load_split(abnormal_with_truth("val"), config, limit)
    if val:
        val_maps, _ = _maps(method, val, torch_device, options)
        val_truths = [t[1] for t in val]
        best = max(FRACTIONS, key=lambda f: np.mean(_scores(val_maps, val_truths, f)["dice"]))
        tuned = _scores(maps, truths, best)
        result["validation_threshold"] = {"fraction_of_max": float(best), **{k: float(np.mean(v)) for k, v in tuned.items() if k != "ncc"}}
    if judge_model is not None:
        result["validity"] = counterfactual_validity(judge_model, [t[0] for t in test], counterfactuals, torch_device)
    return result


@torch.no_grad()
def counterfactual_validity(judge_model, inputs, counterfactuals, device) -> dict:
    """Accuracy of an independent classifier on the abnormal inputs, and the share of counterfactuals it calls normal."""
    _, judge = load_method(judge_model, device)
    net = judge.networks["classifier"]
    x = torch.cat(inputs).to(device)
    before = net(x).softmax(1)[:, 1]
    out = {"n": len(inputs), "abnormal_inputs_called_abnormal": float((before > 0.5).float().mean())}
    if any(cf is None for cf in counterfactuals):
        out["note"] = "method produces no counterfactual"
        return out
    cf = torch.from_numpy(np.stack(counterfactuals))[:, None].to(device).clamp(-1, 1)
    after = net(cf).softmax(1)[:, 1]
    out["counterfactuals_called_normal"] = float((after <= 0.5).float().mean())
    return out


def format_table(results: list[dict]) -> str:
    header = ["method", "n", "Dice (paper)", "IoU (paper)", "NCC", "Dice (val thr)", "IoU (val thr)", "CF called normal"]
    rows = []
    for r in results:
        v = r.get("validation_threshold", {})
        rows.append([
            r["method"], r["n"], f"{100 * r['paper_rule']['dice']:.1f}", f"{100 * r['paper_rule']['iou']:.1f}", f"{r['paper_rule']['ncc']:.3f}",
            f"{100 * v['dice']:.1f}" if v else "-", f"{100 * v['iou']:.1f}" if v else "-",
            f"{100 * r['validity']['counterfactuals_called_normal']:.0f}%" if "counterfactuals_called_normal" in r.get("validity", {}) else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def write_results(results: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2))
