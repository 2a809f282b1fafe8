"""The on-disk cache of preprocessed subjects (`TrainingConfig.cache_dir`, `--cache-dir`): a second run on the
same cohort and grid reads the arrays instead of preprocessing again, and a changed file is preprocessed anew."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import CounterfactualVATrainingLib.data as data
from CounterfactualVALib.preprocessing import PreprocessingConfig
from CounterfactualVATrainingLib.data import cache_split, load_cohort

GRID = PreprocessingConfig(spatial_dims=2, size=[32, 32], spacing=[1.0, 1.0], crop="image", intensity="minmax")


def _refuse_preprocessing(monkeypatch):
    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a cached subject was preprocessed again")

    monkeypatch.setattr(data, "LoadPreprocessd", Refused)


def test_second_load_reads_the_cache_and_gives_the_same_tensors(synthetic_2d, tmp_path, monkeypatch):
    records = load_cohort(synthetic_2d)["train"]
    first = cache_split(records, GRID, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == len(records)
    _refuse_preprocessing(monkeypatch)
    second = cache_split(records, GRID, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)
    assert torch.equal(first.labels, second.labels) and torch.equal(first.has_mask, second.has_mask)


def test_cached_arrays_equal_fresh_preprocessing(synthetic_2d, tmp_path):
    records = load_cohort(synthetic_2d)["val"]
    cache_split(records, GRID, cache_dir=tmp_path / "cache")
    cached = cache_split(records, GRID, cache_dir=tmp_path / "cache")
    fresh = cache_split(records, GRID)
    assert torch.equal(cached.images, fresh.images) and torch.equal(cached.masks, fresh.masks)


def test_changed_file_or_grid_is_preprocessed_again(synthetic_2d, tmp_path, monkeypatch):
    records = [dict(r) for r in load_cohort(synthetic_2d)["val"]]
    # work on copies: the cohort fixture is shared by other tests
    for i, record in enumerate(records):
        copy = tmp_path / f"image_{i}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(record["path"]), str(copy))
        record["path"] = str(copy)
    before = cache_split(records, GRID, cache_dir=tmp_path / "cache")
    image = sitk.ReadImage(records[0]["path"])
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[::-1].copy())
    flipped.CopyInformation(image)
    sitk.WriteImage(flipped, records[0]["path"])
    stat = os.stat(records[0]["path"])
    os.utime(records[0]["path"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new modification time for sure
    after = cache_split(records, GRID, cache_dir=tmp_path / "cache")
    assert not torch.equal(after.images[0], before.images[0])
    assert torch.equal(after.images[0], torch.flip(before.images[0], dims=[1]))  # the new content, preprocessed
    assert torch.equal(after.images[1:], before.images[1:])
    # another grid is another cache entry
    other = PreprocessingConfig(spatial_dims=2, size=[16, 16], spacing=[2.0, 2.0], crop="image", intensity="minmax")
    assert cache_split(records, other, cache_dir=tmp_path / "cache").images.shape[-1] == 16


def test_damaged_cache_entry_is_remade(synthetic_2d, tmp_path):
    records = load_cohort(synthetic_2d)["val"][:2]
    before = cache_split(records, GRID, cache_dir=tmp_path / "cache")
    first, second = sorted((tmp_path / "cache").glob("*.npz"))
    first.write_bytes(b"not an npz")
    second.write_bytes(second.read_bytes()[:200])  # truncated, as by a full disk
    after = cache_split(records, GRID, cache_dir=tmp_path / "cache")
    assert torch.equal(before.images, after.images)
    assert all(np.load(e, allow_pickle=False)["image"].shape == (1, 32, 32) for e in (tmp_path / "cache").glob("*.npz"))
