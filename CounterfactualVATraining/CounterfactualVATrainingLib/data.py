"""Training data: a cohort CSV -> cached model-grid tensors per class and split, through MONAI.

Every image passes through `LoadPreprocessd`, the inference preprocessing, and is cached once
(`monai.data.CacheDataset`). With a `cache_dir` the model-grid arrays are also kept on disk (one ``.npz``
per subject, read without pickle), keyed by the files' paths, sizes and modification times and the
preprocessing settings, so that another run on the same cohort and grid starts in seconds instead of
preprocessing every subject again (2,364 phantoms at 4 mm: about two minutes of one core to make).
Batches are drawn by :class:`UnpairedSampler` from a generator seeded by (seed, step, rank), so the batch
at a given step is the same whether or not the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from CounterfactualVALib.atomic import atomic_path
from CounterfactualVALib.cohort import read_cohort_csv, stratified_split
from CounterfactualVALib.networks.position import grid_coordinates
from CounterfactualVALib.preprocessing import PreprocessingConfig
from CounterfactualVALib.transforms import LoadPreprocessd


@dataclass
class CohortTensors:
    images: torch.Tensor  # (N, 1, *spatial) on the model grid
    labels: torch.Tensor  # (N,)
    masks: torch.Tensor  # (N, 1, *spatial): ground truth (difference map or mask), zeros if unknown
    has_mask: torch.Tensor  # (N,) bool
    paths: list[str]

    def of_class(self, label: int) -> torch.Tensor:
        return torch.nonzero(self.labels == label).flatten()

    def __len__(self) -> int:
        return len(self.paths)


def load_cohort(csv_path: str | Path, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.0) -> dict[str, list[dict]]:
    """Records by split. A CSV without a `split` column is split here, stratified by label (and subtype)."""
    records = read_cohort_csv(csv_path)
    if any(not r.get("split") for r in records):
        strata = [f"{r['label']}:{r.get('subtype') or ''}" for r in records]
        for record, split in zip(records, stratified_split(strata, test_fraction, val_fraction, seed)):
            record["split"] = split
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for record in records:
        splits.setdefault(record["split"], []).append(record)
    for label in (0, 1):
        if not any(r["label"] == label for r in splits["train"]):
            raise ValueError(
                f"The training split of {csv_path} has no subject of class {label}. Both classes (0 = normal, 1 = abnormal) "
                "are needed: add subjects or change the split column."
            )
    return splits


#: bump when what a cached entry holds, or how it is made, changes: older entries are then ignored
CACHE_FORMAT = 1
#: subjects preprocessed (and written to the disk cache) per chunk
CACHE_CHUNK = 100


def _file_identity(path) -> list:
    """What says a file is unchanged: its absolute path, size and modification time (no content hash: hashing
    2,400 volumes would cost a good part of what the cache saves)."""
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(record: dict, config: PreprocessingConfig) -> str:
    """The disk-cache name of one subject on one model grid."""
    identity = {
        "format": CACHE_FORMAT,
        "image": _file_identity(record["path"]),
        "mask": _file_identity(record["mask"]) if record.get("mask") else None,
        "preprocessing": asdict(config),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _read_cached(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as entry:
            return entry["image"], entry["mask"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, or damaged (an entry is written atomically, but a disk fills)
        return None


def _write_cached(path: Path, image: np.ndarray, mask: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, image=image, mask=mask)


def cache_split(
    records: list[dict], config: PreprocessingConfig, num_workers: int = 0, progress: bool = False, cache_dir: str | Path | None = None
) -> CohortTensors:
    """Preprocess and cache one split with MONAI (`progress`: MONAI's bar while caching). With `cache_dir`, the
    subjects already preprocessed onto this grid by an earlier run are read from there and the others are
    added to it."""
    from monai.data import CacheDataset

    arrays: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(records)
    keys: list[str | None] = [None] * len(records)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        for i, record in enumerate(records):
            keys[i] = cache_key(record, config)
            arrays[i] = _read_cached(cache_dir / f"{keys[i]}.npz")
    todo = [i for i, entry in enumerate(arrays) if entry is None]
    # with a disk cache, in chunks written as they are done: an interrupted caching phase keeps its work
    chunk = CACHE_CHUNK if cache_dir is not None else max(len(todo), 1)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        items = [{"image": records[i]["path"], "mask": records[i].get("mask") or None} for i in part]
        dataset = CacheDataset(items, transform=LoadPreprocessd(config), num_workers=num_workers, progress=progress, copy_cache=False)
        for i, item in zip(part, (dataset[j] for j in range(len(dataset)))):
            arrays[i] = (np.asarray(item["image"], np.float32), np.asarray(item["mask"], np.float32))
            if cache_dir is not None:
                _write_cached(cache_dir / f"{keys[i]}.npz", *arrays[i])
        del dataset
    images, masks, labels, has_mask = [], [], [], []
    for record, (image, mask) in zip(records, arrays):
        images.append(torch.as_tensor(image))
        masks.append(torch.as_tensor(mask))
        labels.append(int(record["label"]))
        has_mask.append(bool(record.get("mask")))
    if not images:
        shape = (0, 1, *reversed(config.size))
        return CohortTensors(torch.zeros(shape), torch.zeros(0, dtype=torch.long), torch.zeros(shape), torch.zeros(0, dtype=torch.bool), [])
    return CohortTensors(
        torch.stack(images).float(), torch.tensor(labels), torch.stack(masks).float(), torch.tensor(has_mask), [r["path"] for r in records]
    )


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, rank): the randomness of a step survives resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 97 + rank)


class UnpairedSampler:
    """Draws `batch_size` normal and `batch_size` abnormal images, independently (unpaired), per step.

    With `patch_size` (numpy order, e.g. (z, y, x)) each pair is cropped to one patch at the same random
    position in both images: on images on a common grid the discriminator then compares like with like
    anatomy, and a step costs the patch's voxels instead of the volume's. Patched batches also carry
    "coords": the patch voxels' coordinates on the whole grid (for methods with position channels).
    `augmentation` (e.g. :class:`~.augmentation.AnatomyAugmentation`) is applied to every drawn image, normal
    and abnormal independently, before any crop, with the step's generator.
    """

    def __init__(self, cohort: CohortTensors, batch_size: int, patch_size: tuple[int, ...] | None = None, augmentation=None):
        self.cohort = cohort
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.normal = cohort.of_class(0)
        self.abnormal = cohort.of_class(1)
        spatial = tuple(cohort.images.shape[2:])
        if patch_size is not None:
            patch_size = tuple(int(p) for p in patch_size)
            if len(patch_size) != len(spatial) or any(not 0 < p <= s for p, s in zip(patch_size, spatial)):
                raise ValueError(
                    f"--patch-size {tuple(reversed(patch_size))} does not fit the model grid {tuple(reversed(spatial))}: "
                    "give one positive size per axis, at most the grid's."
                )
            if patch_size == spatial:
                patch_size = None
        self.patch_size = patch_size
        self.coordinates = grid_coordinates(spatial)[None] if patch_size is not None else None

    def _crop(self, tensors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        spatial = tensors[0].shape[2:]
        out = [[] for _ in tensors]
        for i in range(tensors[0].shape[0]):
            corner = [int(torch.randint(s - p + 1, (), generator=generator)) for s, p in zip(spatial, self.patch_size)]
            window = (slice(i, i + 1), slice(None)) + tuple(slice(c, c + p) for c, p in zip(corner, self.patch_size))
            for j, t in enumerate(tensors):
                out[j].append(t[window])
        return [torch.cat(parts, 0) for parts in out]

    def batch(self, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        pick_n = self.normal[torch.randint(len(self.normal), (self.batch_size,), generator=generator)]
        pick_a = self.abnormal[torch.randint(len(self.abnormal), (self.batch_size,), generator=generator)]
        tensors = [self.cohort.images[pick_n], self.cohort.images[pick_a], self.cohort.masks[pick_a]]
        if self.augmentation is not None:
            normal, abnormal, mask = (t.to(device, non_blocking=True) for t in tensors)
            (normal,) = self.augmentation(normal, generator)
            abnormal, mask = self.augmentation(abnormal, generator, masks=(mask,))
            tensors = [normal, abnormal, mask]
        if self.patch_size is None:
            normal, abnormal, mask = (t.to(device, non_blocking=True) for t in tensors)
            return {"normal": normal, "abnormal": abnormal, "abnormal_mask": mask}
        tensors.append(self.coordinates.expand(len(pick_n), *self.coordinates.shape[1:]))
        normal, abnormal, mask, coords = (t.to(device, non_blocking=True) for t in self._crop(tensors, generator))
        return {"normal": normal, "abnormal": abnormal, "abnormal_mask": mask, "coords": coords}


def describe(cohort: CohortTensors, csv_path: str | Path) -> str:
    n0 = int((cohort.labels == 0).sum())
    n1 = int((cohort.labels == 1).sum())
    return f"{n0} normal + {n1} abnormal training subjects from {Path(csv_path).name}"
