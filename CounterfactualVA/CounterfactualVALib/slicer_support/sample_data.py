"""The shipped demonstration sample (a phantom scan and a model trained on phantoms, see samples/README.md),
where the module finds it, and how it is registered with Slicer's Sample Data module."""

from __future__ import annotations

import hashlib
import os
import pathlib

SAMPLE_SCAN = "phantom_atrophy.nii.gz"
SAMPLE_MODEL = "vantgan_phantom3d.safetensors"
SAMPLE_CATEGORY = "CounterfactualVA"
#: Resources/Icons of the module; about 260x280 pixels, as Slicer's module template asks of sample thumbnails
SAMPLE_THUMBNAIL = "CounterfactualVAPhantomAtrophy.png"


def sample_directories(moduleDir: str) -> list:
    """Where the shipped sample files are looked for, in order: the installed module's Resources/Samples
    (CMake installs them there), then the source tree's samples/ folder (running from a checkout)."""
    return [os.path.join(moduleDir, "Resources", "Samples"), os.path.join(os.path.dirname(moduleDir), "samples")]


def sample_file_path(fileName: str, moduleDir: str) -> str | None:
    """Absolute path of a shipped sample file (first folder of :func:`sample_directories` that has it), or None."""
    for folder in sample_directories(moduleDir):
        path = os.path.join(folder, fileName)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def sample_data_source(moduleDir: str) -> dict | None:
    """The keyword arguments of SampleData's registerCustomSampleDataSource for the shipped phantom, or None
    when the scan is not found. The SHA-256 makes SampleData replace a cached copy of an older sample (it
    caches by file name and, without a checksum, reuses whatever has that name)."""
    scan = sample_file_path(SAMPLE_SCAN, moduleDir)
    if scan is None:
        return None
    with open(scan, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    thumbnail = os.path.join(moduleDir, "Resources", "Icons", SAMPLE_THUMBNAIL)
    return dict(
        category=SAMPLE_CATEGORY, sampleName="CounterfactualVAPhantomAtrophy", uris=pathlib.Path(scan).as_uri(), fileNames=SAMPLE_SCAN,
        nodeNames="phantom_atrophy", checksums=f"SHA256:{digest}", loadFileTypes="VolumeFile",
        thumbnailFileName=thumbnail if os.path.isfile(thumbnail) else None,
    )


def register_sample_data(moduleDir: str) -> bool:
    """Add the shipped phantom to Slicer's Sample Data module (category 'CounterfactualVA'); True when done
    (False without the scan or outside the application). The model is not a scene node: the panel offers it
    as the default model."""
    source = sample_data_source(moduleDir)
    if source is None:
        return False
    try:
        import SampleData
    except ImportError:
        return False
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
    return True
