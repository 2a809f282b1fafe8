"""Where computations run: the choices every entry point offers, and the choice made. torch is imported only
when a device is selected, so that user interfaces can list the choices without it."""

from __future__ import annotations

#: `--device` of every command, the Slicer panels' device choice
DEVICES = ("auto", "cpu", "cuda")


def select_device(requested: str = "auto"):
    """(torch.device, one line saying which) for a choice of :data:`DEVICES`; InputError for an unknown or
    unavailable one."""
    import torch

    from .imageio import InputError

    if requested not in DEVICES:
        raise InputError(f"Unknown device {requested!r}: use {', '.join(DEVICES)}.")
    if requested == "cpu":
        return torch.device("cpu"), "CPU (as requested)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return torch.device("cuda"), f"CUDA: {name} ({memory:.0f} GiB)"
    if requested == "cuda":
        raise InputError("CUDA was requested but no CUDA GPU is available to PyTorch here. Use --device cpu (or auto).")
    return torch.device("cpu"), "CPU (no CUDA GPU found)"
