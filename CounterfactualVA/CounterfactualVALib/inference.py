"""The attribution pipeline: file in, files out, in the input's own geometry.

input file -> validate -> preprocess to the model grid -> method.attribute -> back to the input grid ->
counterfactual, signed map, mask, extras, figure, summary.json. The Slicer module runs exactly this
through the command line in a subprocess.

The counterfactual is written as input + map (map resampled to the input grid), so it equals the input
voxel for voxel wherever the model found no difference, instead of a blurred copy of the model-grid image.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import __version__
from .checkpoint import ModelMetadata, read_metadata
from .imageio import InputError, image_extension, image_from_array, read_image, validate_image, write_image
from .method_options import check_values, option_specs_from_metadata
from .methods import load_method
from .metrics import threshold_map
from .preprocessing import PreprocessingConfig, head_mask, preprocess, to_input_grid

ProgressCallback = Callable[[float, str], None]


def select_device(requested: str = "auto"):
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise InputError(f"Unknown device {requested!r}: use auto, cpu or cuda.")
    if requested == "cpu":
        return torch.device("cpu"), "CPU (as requested)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return torch.device("cuda"), f"CUDA: {name} ({memory:.0f} GiB)"
    if requested == "cuda":
        raise InputError("CUDA was requested but no CUDA GPU is available to PyTorch here. Use --device cpu (or auto).")
    return torch.device("cpu"), "CPU (no CUDA GPU found)"


def output_names(input_path: str | os.PathLike, file_ext: str | None = None) -> tuple[str, str]:
    """(stem, extension) for output files: `<stem>_counterfactual<ext>` and so on."""
    ext = file_ext or image_extension(input_path)
    if ext not in (".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd"):
        ext = ".nii.gz"
    name = Path(input_path).name
    stem = name[: -len(image_extension(input_path))] if image_extension(input_path) else Path(name).stem
    return stem, ext


def run_attribution(
    model_path: str | os.PathLike,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "auto",
    threshold_rule: str = "paper",
    threshold_value: float | None = None,
    method_options: dict | None = None,
    file_ext: str | None = None,
    figure: bool = True,
    progress: ProgressCallback | None = None,
) -> dict:
    """Run the whole pipeline and return the summary (also written to `<out_dir>/summary.json`).

    All outputs are written to a staging folder first and moved into `out_dir` at the end, so a failed
    or cancelled run leaves nothing half-written behind.
    """
    progress = progress or (lambda fraction, stage: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def mark(stage: str, start: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - start, 4)
        return now

    progress(0.02, "Checking model file")
    metadata = read_metadata(model_path)
    check_values(metadata.method, "options", option_specs_from_metadata(metadata), method_options or {})  # before any work
    config = PreprocessingConfig.from_dict(metadata.preprocessing)
    progress(0.05, "Reading input")
    # Validated once here (a one-slice 3D file becomes 2D for a 2D model); outputs take this image's grid.
    original = read_image(input_path)
    image = validate_image(original, config.spatial_dims)
    t = mark("read", t0)

    progress(0.10, "Preprocessing to the model grid")
    array, state = preprocess(image, config)
    t = mark("preprocess", t)

    progress(0.20, "Loading model")
    import torch

    torch_device, device_description = select_device(device)
    metadata, method = load_method(model_path, torch_device)
    t = mark("load_model", t)

    progress(0.30, f"Running {method.title} on {device_description}")
    x = torch.from_numpy(array)[None, None].to(torch_device)
    try:
        result = method.attribute(x, **(method_options or {}))
    except torch.cuda.OutOfMemoryError:
        raise InputError("The GPU ran out of memory for this model. Run on the CPU instead (--device cpu).") from None
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    t = mark("attribute", t)

    progress(0.75, "Resampling outputs to the input grid")
    attribution = to_input_grid(result.attribution[0, 0].float().cpu().numpy(), state, image, kind="difference")
    attribution_array = sitk.GetArrayFromImage(attribution)
    input_array = sitk.GetArrayFromImage(image)
    outputs: dict[str, sitk.Image] = {"attribution": attribution}
    if result.counterfactual is not None:
        outputs["counterfactual"] = image_from_array(input_array + attribution_array, image)
    extra_files = {}
    for name, tensor in result.extras.items():
        kind = result.extra_kinds.get(name, "difference")
        outputs[name] = to_input_grid(tensor[0, 0].float().cpu().numpy(), state, image, kind=kind)
        extra_files[name] = kind
    # For head-cropped models the mask marks head voxels only, and the threshold (max-fraction or
    # percentile) is computed over them: differences in the air around the head are not findings.
    # Synthetic/pre-cropped images ("image" crop) have no background to leave out. The map itself is
    # written as the model made it.
    foreground = head_mask(input_array, config.foreground_fraction) if config.crop == "foreground" else None
    mask_array, threshold = threshold_map(attribution_array, threshold_rule, threshold_value, foreground=foreground)
    mask = image_from_array(mask_array, image)
    outputs["mask"] = mask
    t = mark("postprocess", t)

    progress(0.85, "Writing outputs")
    stem, ext = output_names(input_path, file_ext)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        files: dict[str, str] = {}
        for name, out_image in outputs.items():
            file_name = f"{stem}_{name}{ext}"
            write_image(_in_file_geometry(out_image, original), staging / file_name)
            files[name] = file_name
        series_files = {}
        for name, frames in result.series.items():
            file_name = f"{stem}_{name}_series{ext}"
            write_image(_in_file_geometry(_series_image(frames, state, image), original), staging / file_name)
            series_files[name] = file_name
        figure_name = None
        if figure:
            from .figure import save_overview_figure

            figure_name = f"{stem}_figure.png"
            save_overview_figure(
                staging / figure_name, image, attribution, mask, outputs.get("counterfactual"),
                title=f"{method.title}: {Path(input_path).name}", region=foreground,
            )
        t = mark("write", t)
        timings["total"] = round(time.perf_counter() - t0, 4)
        mask_voxels = int(mask_array.sum())
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        summary = {
            "package_version": __version__,
            "method": metadata.method,
            "method_title": method.title,
            "description": describe_run(metadata, method, model_path, input_path, threshold_rule, threshold, device_description),
            "map_sign": method.map_description,
            "input": str(Path(input_path).resolve()),
            "model": str(Path(model_path).resolve()),
            "classes": metadata.classes,
            "normal_class": metadata.normal_class,
            "outputs": {
                "counterfactual": files.get("counterfactual"),
                "attribution": files["attribution"],
                "mask": files["mask"],
                "extras": {name: files[name] for name in extra_files},
                "extra_kinds": extra_files,
                "series": series_files,
                "figure": figure_name,
            },
            "scalars": {k: float(v) for k, v in result.scalars.items()},
            "series_values": result.series_values,
            "thresholds": {"rule": threshold_rule, "value": threshold_value, "applied_to_abs_map": threshold},
            "mask_voxels": mask_voxels,
            "mask_volume_ml": mask_voxels * voxel_ml if image.GetDimension() == 3 else None,
            "attribution_range": [float(attribution_array.min()), float(attribution_array.max())],
            "device": device_description,
            "timings_s": timings,
            "preprocess_state": state.to_dict(),
        }
        with open(staging / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        # Move everything into place; summary.json last, so its presence means the run is complete.
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "summary.json"):
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(1.0, "Done")
    return summary


def _in_file_geometry(output: sitk.Image, original: sitk.Image) -> sitk.Image:
    """Outputs of a one-slice 3D file run through a 2D model go back into the file's own 3D geometry
    (slice position, through-plane spacing, oblique direction), not a 2D image that has lost them."""
    if output.GetDimension() == original.GetDimension():
        return output
    components = output.GetNumberOfComponentsPerPixel()
    shape = sitk.GetArrayViewFromImage(original).shape + ((components,) if components > 1 else ())
    restored = sitk.GetImageFromArray(sitk.GetArrayFromImage(output).reshape(shape), isVector=components > 1)
    restored.CopyInformation(original)
    return restored


def _series_image(frames, state, image: sitk.Image) -> sitk.Image:
    """A (time, 1, 1, *spatial) series on the model grid -> a multi-component image on the input grid
    (one component per frame), which NRRD and NIfTI store and Slicer loads as a vector volume."""
    components = [to_input_grid(frame[0, 0].float().cpu().numpy(), state, image, kind="intensity") for frame in frames]
    return sitk.Compose(components)


def describe_run(metadata: ModelMetadata, method, model_path, input_path, rule, threshold, device_description) -> str:
    training = metadata.training or {}
    return (
        f"{method.title} counterfactual attribution of {Path(input_path).name} with model {Path(model_path).name} "
        f"(trained {training.get('steps', '?')} steps on {training.get('data_summary', 'unknown data')}); "
        f"map = {method.map_description}; mask: |map| >= {threshold:.4g} (rule {rule}); "
        f"device {device_description}; CounterfactualVA {__version__}."
    )
