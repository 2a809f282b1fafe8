"""The run summary: what one attribution run wrote and found, as one typed, versioned record.

The pipeline (:mod:`CounterfactualVALib.inference`) writes it as ``summary.json`` in the output folder, last,
so its presence means the run is complete; the Slicer module, the node adapter and the benchmarks read it
back through :meth:`RunSummary.read`. Nothing else knows the JSON keys. Plain Python (json, dataclasses):
importable in Slicer without torch.

Version history (``summary_version``):
1. The keys below. Files written before versions existed (no ``summary_version``) have the same keys and
   are read as version 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUMMARY_VERSION = 1
SUMMARY_FILE = "summary.json"


class SummaryError(RuntimeError):
    """A summary.json that cannot be used (a run that did not finish, a damaged or newer file): the message
    says what is wrong and what to do."""


@dataclass(frozen=True)
class OutputFiles:
    """File names (relative to the output folder) of everything the run wrote; None where not written."""

    attribution: str
    mask: str
    counterfactual: str | None = None
    #: method extras: name -> file, with their kind ("difference", "probability", "intensity", "label")
    extras: dict[str, str] = field(default_factory=dict)
    extra_kinds: dict[str, str] = field(default_factory=dict)
    #: image series (one component per frame): name -> file
    series: dict[str, str] = field(default_factory=dict)
    figure: str | None = None

    def volumes(self) -> dict[str, str]:
        """role -> file of every image volume written (counterfactual, attribution, mask, extras, series)."""
        roles = {"counterfactual": self.counterfactual, "attribution": self.attribution, "mask": self.mask}
        roles.update({f"extra:{name}": file for name, file in self.extras.items()})
        roles.update({f"series:{name}": file for name, file in self.series.items()})
        return {role: file for role, file in roles.items() if file}


@dataclass(frozen=True)
class Thresholds:
    """How the mask was made: the rule, the value the user gave (None: the rule's default) and the
    threshold on |map| it came to."""

    rule: str
    value: float | None
    applied_to_abs_map: float


@dataclass
class RunSummary:
    package_version: str
    method: str
    method_title: str
    #: one sentence saying what was run on what, with which model, threshold and device
    description: str
    #: what the sign of the attribution map means for this method
    map_sign: str
    input: str
    model: str
    classes: list[str]
    normal_class: int
    outputs: OutputFiles
    thresholds: Thresholds
    mask_voxels: int
    #: None for 2D images
    mask_volume_ml: float | None
    attribution_range: list[float]
    device: str
    #: seconds per stage, in-process, in order (see inference.STAGES), and "total" (read to summary)
    timings_s: dict[str, float]
    #: the model-grid placement and intensity mapping, see preprocessing.PreprocessState
    preprocess_state: dict[str, Any]
    scalars: dict[str, float] = field(default_factory=dict)
    series_values: dict[str, list] = field(default_factory=dict)
    #: seconds each output file took to write (file name -> s; the files and the figure are written
    #: concurrently within the "write" stage, so these overlap)
    write_s: dict[str, float] = field(default_factory=dict)
    summary_version: int = SUMMARY_VERSION

    # --- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "summary") -> "RunSummary":
        if not isinstance(data, dict):
            raise SummaryError(f"{source} is not a JSON object: the output folder is damaged; run the attribution again.")
        version = data.get("summary_version", 1)
        if not isinstance(version, int) or version > SUMMARY_VERSION:
            raise SummaryError(
                f"{source} has summary version {version!r}, newer than this CounterfactualVA reads ({SUMMARY_VERSION}): "
                "update CounterfactualVA, or read it with the version that wrote it."
            )
        values = dict(data)
        try:
            values["outputs"] = _build(OutputFiles, values.get("outputs"), f"{source} 'outputs'")
            values["thresholds"] = _build(Thresholds, values.get("thresholds"), f"{source} 'thresholds'")
        except TypeError as exc:
            raise SummaryError(str(exc)) from None
        return _build(cls, values, source)

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / SUMMARY_FILE
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "RunSummary":
        """The summary of the run whose outputs are in `folder` (SummaryError if missing or unusable)."""
        path = Path(folder) / SUMMARY_FILE
        if not path.is_file():
            raise SummaryError(f"The attribution finished without a summary ({path} is missing): the output is incomplete.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SummaryError(f"{path} cannot be read ({exc}): the output folder is damaged; run the attribution again.") from None
        return cls.from_dict(data, str(path))


def _build(kind: type, values: Any, source: str):
    """`kind(**values)` with a clear error for a missing or unknown key (instead of a TypeError)."""
    if not isinstance(values, dict):
        raise SummaryError(f"{source} is missing or not an object: the output is incomplete; run the attribution again.")
    names = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise SummaryError(f"{source} lacks {', '.join(missing)}: the output is incomplete; run the attribution again.")
    return kind(**{k: v for k, v in values.items() if k in names})

