"""The attribution pipeline: file in, files out, in the input's own geometry, as named stages.

    model = load_model(path, device)                      # once per model file (the warm worker keeps it)
    source = read_input(path); image = validate_input(source, model.config)
    model_input = preprocess_input(image, model.config)   # one resampling onto the model grid
    result = attribute(model, model_input, options)       # the method, on the model grid
    outputs = postprocess(result, model_input, image, model.config, rule, value)   # back onto the input grid
    files, seconds = write_outputs(outputs, folder, stem, ext, source, meanwhile=draw_figure)   # concurrently

:func:`run_attribution` runs them in that order, times each stage (``RunSummary.timings_s``) and writes the
:class:`~CounterfactualVALib.run_summary.RunSummary`. The command line, the warm worker and through them the
Slicer module run exactly this.

The counterfactual is written as input + map (map resampled to the input grid), so it equals the input
voxel for voxel wherever the model found no difference, instead of a blurred copy of the model-grid image.
Only torch and the method's own modules are imported for a model (MONAI only by methods that build on its
blocks): importing MONAI loads its whole package (~2 s on a CPU), a large part of a command's wait.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import SimpleITK as sitk

from . import __version__
from .checkpoint import ModelMetadata
from .devices import select_device
from .imageio import InputError, image_extension, image_from_array, read_image, validate_image, write_image
from .method_options import check_values, option_specs_from_metadata
from .methods import load_method
from .metrics import check_threshold, threshold_map
from .preprocessing import PreprocessingConfig, PreprocessState, input_head_mask, preprocess_validated, to_input_grid
from .run_summary import SUMMARY_FILE, OutputFiles, RunSummary, Thresholds

if TYPE_CHECKING:
    import torch

    from .methods import AttributionResult, Method

ProgressCallback = Callable[[float, str], None]

#: the stages :func:`run_attribution` times, in order (``RunSummary.timings_s``; "write" covers the volumes
#: and the figure, made concurrently, each timed in ``RunSummary.write_s``)
STAGES = ("load_model", "read", "validate", "preprocess", "attribute", "postprocess", "write")


# --- stage: load the model -------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model file read once (metadata checked, weights verified and loaded) on a device, ready to run."""

    path: Path
    metadata: ModelMetadata
    method: "Method"
    device: "torch.device"
    device_description: str

    @property
    def config(self) -> PreprocessingConfig:
        return PreprocessingConfig.from_dict(self.metadata.preprocessing)


def load_model(model_path: str | os.PathLike, device: str = "auto") -> LoadedModel:
    torch_device, description = select_device(device)
    metadata, method = load_method(model_path, torch_device)
    return LoadedModel(Path(model_path).resolve(), metadata, method, torch_device, description)


# --- stages: read, validate, preprocess -----------------------------------------------------------------


@dataclass
class InputImage:
    """The input as the pipeline uses it: the file's image, the validated float32 image outputs take their
    grid from, its voxels (a view, numpy order) and, for head-cropped models, its head mask (computed once)."""

    path: Path
    source: sitk.Image
    image: sitk.Image
    array: np.ndarray
    head: np.ndarray | None


def read_input(input_path: str | os.PathLike) -> sitk.Image:
    return read_image(input_path)


def validate_input(source: sitk.Image, config: PreprocessingConfig, input_path: str | os.PathLike = "input") -> InputImage:
    # A one-slice 3D file becomes 2D for a 2D model; outputs go back into the file's geometry when written.
    image = validate_image(source, config.spatial_dims)
    array = sitk.GetArrayViewFromImage(image)
    return InputImage(Path(input_path), source, image, array, input_head_mask(array, config))


@dataclass
class ModelInput:
    """The input on the model grid (numpy order, model intensities) and how it got there."""

    array: np.ndarray
    state: PreprocessState


def preprocess_input(image: InputImage, config: PreprocessingConfig) -> ModelInput:
    return ModelInput(*preprocess_validated(image.image, config, image.head))


# --- stage: attribute ------------------------------------------------------------------------------------


def attribute(model: LoadedModel, model_input: ModelInput, options: dict | None = None) -> "AttributionResult":
    import torch

    x = torch.from_numpy(model_input.array)[None, None].to(model.device)
    try:
        result = model.method.attribute(x, **(options or {}))
    except torch.cuda.OutOfMemoryError:
        raise InputError("The GPU ran out of memory for this model. Run on the CPU instead (--device cpu).") from None
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return result


# --- stage: postprocess ------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """Everything to write, on the input's grid: role -> image ("counterfactual", "attribution", "mask", extras),
    series images, and what the mask and the summary need."""

    images: dict[str, sitk.Image]
    series: dict[str, sitk.Image]
    extra_kinds: dict[str, str]
    attribution: np.ndarray
    mask: np.ndarray
    threshold: float
    #: head voxels for head-cropped models (the mask's and the figure's region), else None
    region: np.ndarray | None
    scalars: dict[str, float] = field(default_factory=dict)
    series_values: dict[str, list] = field(default_factory=dict)


def _model_grid_array(tensor) -> np.ndarray:
    return tensor[0, 0].float().cpu().numpy()


def postprocess(
    result: "AttributionResult", model_input: ModelInput, image: InputImage, config: PreprocessingConfig,
    threshold_rule: str = "paper", threshold_value: float | None = None,
) -> Outputs:
    state = model_input.state
    attribution = to_input_grid(_model_grid_array(result.attribution), state, image.image, kind="difference")
    attribution_array = sitk.GetArrayViewFromImage(attribution)
    images: dict[str, sitk.Image] = {}
    if result.counterfactual is not None:
        images["counterfactual"] = image_from_array(image.array + attribution_array, image.image)
    images["attribution"] = attribution
    extra_kinds = {}
    for name, tensor in result.extras.items():
        kind = result.extra_kinds.get(name, "difference")
        images[name] = to_input_grid(_model_grid_array(tensor), state, image.image, kind=kind)
        extra_kinds[name] = kind
    # For head-cropped models the mask marks head voxels only, and the threshold (max-fraction or
    # percentile) is computed over them: differences in the air around the head are not findings.
    # Synthetic/pre-cropped images ("image" crop) have no background to leave out. The map itself is
    # written as the model made it.
    mask_array, threshold = threshold_map(attribution_array, threshold_rule, threshold_value, foreground=image.head)
    images["mask"] = image_from_array(mask_array, image.image)
    series = {name: _series_image(frames, state, image.image) for name, frames in result.series.items()}
    return Outputs(
        images, series, extra_kinds, attribution_array, mask_array, threshold, image.head,
        {k: float(v) for k, v in result.scalars.items()}, result.series_values,
    )


def _series_image(frames, state, image: sitk.Image) -> sitk.Image:
    """A (time, 1, 1, *spatial) series on the model grid -> a multi-component image on the input grid
    (one component per frame), which NRRD and NIfTI store and Slicer loads as a vector volume."""
    components = [to_input_grid(_model_grid_array(frame), state, image, kind="intensity") for frame in frames]
    return sitk.Compose(components)


# --- stage: write ------------------------------------------------------------------------------------


def output_names(input_path: str | os.PathLike, file_ext: str | None = None) -> tuple[str, str]:
    """(stem, extension) for output files: `<stem>_counterfactual<ext>` and so on."""
    ext = file_ext or image_extension(input_path)
    if ext not in (".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd"):
        ext = ".nii.gz"
    name = Path(input_path).name
    stem = name[: -len(image_extension(input_path))] if image_extension(input_path) else Path(name).stem
    return stem, ext


def write_outputs(
    outputs: Outputs, folder: Path, stem: str, ext: str, source: sitk.Image, compress: bool = True,
    meanwhile: Callable[[], None] | None = None,
) -> tuple[OutputFiles, dict[str, float]]:
    """Write every volume into `folder`, concurrently (SimpleITK and zlib release the GIL, so the files
    use the free cores), and run `meanwhile` (e.g. the figure) in this thread in the meantime.

    Returns the file names and each file's own write time (they overlap). `compress`: False writes NRRD/MHA
    uncompressed (for files read back at once, e.g. by the Slicer module); ``.nii.gz`` is always compressed."""
    names = {role: f"{stem}_{role}{ext}" for role in outputs.images}
    series = {name: f"{stem}_{name}_series{ext}" for name in outputs.series}
    jobs = [(names[role], image) for role, image in outputs.images.items()]
    jobs += [(series[name], image) for name, image in outputs.series.items()]

    def write(file_name: str, image: sitk.Image) -> float:
        start = time.perf_counter()
        write_image(_in_file_geometry(image, source), folder / file_name, compress=compress)
        return round(time.perf_counter() - start, 4)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        pending = {file_name: pool.submit(write, file_name, image) for file_name, image in jobs}
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            seconds = {file_name: future.result() for file_name, future in pending.items()}
    files = OutputFiles(
        attribution=names["attribution"], mask=names["mask"], counterfactual=names.get("counterfactual"),
        extras={name: names[name] for name in outputs.extra_kinds}, extra_kinds=dict(outputs.extra_kinds), series=series,
    )
    return files, seconds


def _in_file_geometry(output: sitk.Image, source: sitk.Image) -> sitk.Image:
    """Outputs of a one-slice 3D file run through a 2D model go back into the file's own 3D geometry
    (slice position, through-plane spacing, oblique direction), not a 2D image that has lost them."""
    if output.GetDimension() == source.GetDimension():
        return output
    components = output.GetNumberOfComponentsPerPixel()
    shape = sitk.GetArrayViewFromImage(source).shape + ((components,) if components > 1 else ())
    restored = sitk.GetImageFromArray(sitk.GetArrayFromImage(output).reshape(shape), isVector=components > 1)
    restored.CopyInformation(source)
    return restored


# --- the whole pipeline ----------------------------------------------------------------------------------


def run_attribution(
    model_path: str | os.PathLike | LoadedModel,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "auto",
    threshold_rule: str = "paper",
    threshold_value: float | None = None,
    method_options: dict | None = None,
    file_ext: str | None = None,
    figure: bool = True,
    progress: ProgressCallback | None = None,
    compress: bool = True,
) -> RunSummary:
    """Run the whole pipeline and return the summary (also written to `<out_dir>/summary.json`).

    `model_path` may be a :class:`LoadedModel` (from :func:`load_model`), which is then used as it is (its
    device; `device` is ignored): the warm worker loads each model once. All outputs are written to a
    staging folder first and moved into `out_dir` at the end, so a failed or cancelled run leaves nothing
    half-written behind.
    """
    progress = progress or (lambda fraction, stage: None)
    timings: dict[str, float] = {}
    start_of_run = time.perf_counter()
    clock = [start_of_run]

    def done(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - clock[0], 4)
        clock[0] = now

    check_threshold(threshold_rule, threshold_value)  # before any work: a bad value would only fail at the end
    if isinstance(model_path, LoadedModel):
        model = model_path
        timings["load_model"] = 0.0
    else:
        progress(0.02, "Loading model")
        model = load_model(model_path, device)
        done("load_model")
    # Options are checked against the model's own declarations before any work on the input.
    try:
        check_values(model.metadata.method, "options", option_specs_from_metadata(model.metadata), method_options or {})
    except ValueError as exc:
        raise InputError(f"Method option refused ({exc})", "fix the --option KEY=VALUE pair; `counterfactualva methods` lists each method's options.") from None
    config = model.config
    progress(0.20, "Reading input")
    source = read_input(input_path)
    done("read")
    image = validate_input(source, config, input_path)
    done("validate")
    progress(0.25, "Preprocessing to the model grid")
    model_input = preprocess_input(image, config)
    done("preprocess")
    progress(0.30, f"Running {model.method.title} on {model.device_description}")
    result = attribute(model, model_input, method_options)
    done("attribute")
    progress(0.70, "Resampling outputs to the input grid")
    outputs = postprocess(result, model_input, image, config, threshold_rule, threshold_value)
    done("postprocess")

    progress(0.80, "Writing outputs" + (" and the figure" if figure else ""))
    stem, ext = output_names(input_path, file_ext)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    figure_name = f"{stem}_figure.png" if figure else None
    write_seconds: dict[str, float] = {}

    def draw_figure() -> None:
        from .figure import save_overview_figure

        start = time.perf_counter()
        counterfactual = outputs.images.get("counterfactual")
        save_overview_figure(
            staging / figure_name, image.image, image.array, outputs.attribution, outputs.mask,
            title=f"{model.method.title}: {Path(input_path).name}", region=outputs.region,
            counterfactual=None if counterfactual is None else sitk.GetArrayViewFromImage(counterfactual),
        )
        write_seconds[figure_name] = round(time.perf_counter() - start, 4)

    try:
        files, seconds = write_outputs(outputs, staging, stem, ext, source, compress, meanwhile=draw_figure if figure else None)
        write_seconds.update(seconds)
        if figure_name:
            files = replace(files, figure=figure_name)
        done("write")
        timings["total"] = round(time.perf_counter() - start_of_run, 4)
        summary = make_summary(model, input_path, image, outputs, files, threshold_rule, threshold_value, timings, write_seconds, model_input.state)
        summary.write(staging)
        # Move everything into place; summary.json last, so its presence means the run is complete.
        for item in sorted(staging.iterdir(), key=lambda p: p.name == SUMMARY_FILE):
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(1.0, "Done")
    return summary


def make_summary(
    model: LoadedModel, input_path, image: InputImage, outputs: Outputs, files: OutputFiles, rule: str, value,
    timings: dict, write_seconds: dict, state: PreprocessState,
) -> RunSummary:
    metadata, method = model.metadata, model.method
    mask_voxels = int(np.count_nonzero(outputs.mask))
    voxel_ml = float(np.prod(image.image.GetSpacing())) / 1000.0
    return RunSummary(
        package_version=__version__,
        method=metadata.method,
        method_title=method.title,
        description=describe_run(metadata, method, model.path, input_path, rule, outputs.threshold, model.device_description),
        map_sign=method.map_description,
        input=str(Path(input_path).resolve()),
        model=str(model.path),
        classes=list(metadata.classes),
        normal_class=metadata.normal_class,
        outputs=files,
        thresholds=Thresholds(rule=rule, value=value, applied_to_abs_map=outputs.threshold),
        mask_voxels=mask_voxels,
        mask_volume_ml=mask_voxels * voxel_ml if image.image.GetDimension() == 3 else None,
        attribution_range=[float(outputs.attribution.min()), float(outputs.attribution.max())],
        device=model.device_description,
        timings_s=timings,
        write_s=write_seconds,
        preprocess_state={k: list(v) if isinstance(v, tuple) else v for k, v in state.to_dict().items()},  # as JSON reads back
        scalars=outputs.scalars,
        series_values=outputs.series_values,
    )


def describe_run(metadata: ModelMetadata, method, model_path, input_path, rule, threshold, device_description) -> str:
    training = metadata.training or {}
    return (
        f"{method.title} counterfactual attribution of {Path(input_path).name} with model {Path(model_path).name} "
        f"(trained {training.get('steps', '?')} steps on {training.get('data_summary', 'unknown data')}); "
        f"map = {method.map_description}; mask: |map| >= {threshold:.4g} (rule {rule}); "
        f"device {device_description}; CounterfactualVA {__version__}."
    )
