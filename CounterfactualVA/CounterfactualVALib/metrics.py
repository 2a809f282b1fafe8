"""Map thresholding and the papers' evaluation metrics (numpy; used by inference, validation, evaluation).

Threshold rules for turning a signed map into a mask:
- "paper" / "max-fraction": |map| >= value * max|map| (default value 0.5). The VANT-GAN paper (section
  5.1.2) says it "use[s] the maximum pixel value as a threshold"; a threshold at the maximum itself keeps
  one voxel, so we read it as a fraction of the maximum and make the fraction explicit.
- "percentile": |map| >= the value-th percentile of |map| (default 99), over the foreground if given.
- "absolute": |map| >= value, in the map's units (input intensity units after postprocessing).
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLD_RULES = {"paper": 0.5, "max-fraction": 0.5, "percentile": 99.0, "absolute": None}


def check_threshold(rule: str, value: float | None) -> float:
    """The threshold value `rule` will use (its default when `value` is None), checked before any work is
    done: a value outside the rule's range would give an empty or full mask without a word."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"Unknown threshold rule {rule!r} — choose one of {', '.join(THRESHOLD_RULES)}.")
    if value is None:
        value = THRESHOLD_RULES[rule]
        if value is None:
            raise ValueError("The 'absolute' threshold rule needs a value — add --threshold-value V (in the map's intensity units, V > 0).")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Threshold value {value!r} is not a number — pass a number with --threshold-value.") from None
    if rule in ("paper", "max-fraction") and not 0 < value <= 1:
        raise ValueError(f"The {rule} threshold is a fraction of the largest |map| and must lie in (0, 1], got {value} — e.g. --threshold-value 0.5.")
    if rule == "percentile" and not 0 <= value <= 100:
        raise ValueError(f"The percentile threshold must lie in [0, 100], got {value} — e.g. --threshold-value 99.")
    if rule == "absolute" and not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"The absolute threshold must be a positive finite number (|map| >= value), got {value} — "
            "pass a value in the map's intensity units, or use --threshold-rule percentile."
        )
    return value


def threshold_map(attribution: np.ndarray, rule: str = "paper", value: float | None = None, foreground: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(mask uint8 0/1, threshold applied to |map|). With `foreground`, the rule looks at those voxels only
    and the mask never extends outside them."""
    value = check_threshold(rule, value)
    magnitude = np.abs(attribution)
    region = foreground > 0 if foreground is not None and (foreground > 0).any() else np.ones(magnitude.shape, bool)
    if rule in ("paper", "max-fraction"):
        threshold = float(value) * float(magnitude[region].max())
    elif rule == "percentile":
        threshold = float(np.percentile(magnitude[region], value))
    else:
        threshold = float(value)
    if threshold <= 0:
        return np.zeros(attribution.shape, np.uint8), threshold  # an all-zero map marks nothing
    return ((magnitude >= threshold) & region).astype(np.uint8), threshold


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    p, t = prediction > 0, truth > 0
    denominator = p.sum() + t.sum()
    return float(2.0 * (p & t).sum() / denominator) if denominator else 1.0


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    p, t = prediction > 0, truth > 0
    union = (p | t).sum()
    return float((p & t).sum() / union) if union else 1.0


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation (Pearson r) of two maps, optionally inside a mask. 0 for a constant map."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if mask is not None:
        keep = np.asarray(mask).ravel() > 0
        a, b = a[keep], b[keep]
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def map_scores(attribution: np.ndarray, truth: np.ndarray, rule: str = "paper", value: float | None = None, region: np.ndarray | None = None) -> dict[str, float]:
    """NCC of |map| with |truth| and Dice/IoU of the thresholded map against truth != 0 (one image).

    With `region` (the head, for head-cropped models) the threshold rule, the mask and the NCC consider those
    voxels only, as the inference mask does: the model's output in the air around the head is not scored.
    """
    mask, _ = threshold_map(attribution, rule, value, foreground=region)
    truth_mask = np.abs(truth) > 1e-6
    return {
        "ncc": ncc(np.abs(attribution), np.abs(truth), mask=region),
        "dice": dice(mask, truth_mask),
        "iou": iou(mask, truth_mask),
    }
