"""torch.nn layer classes by spatial dimensionality, so one network class serves 2D and 3D.

The same classes MONAI's layer factories return (``Conv[Conv.CONV, 3]`` is ``nn.Conv3d``), looked up here
without importing MONAI: its package import loads every submodule (about 2 s on a CPU), which a command
that only runs a generator should not wait for.
"""

from __future__ import annotations

from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
ADAPTIVE_AVG_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def conv_block(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
    norm: str | None = None, act: str | tuple[str, float] | None = None, bias: bool = True, transposed: bool = False,
    padding: int | None = None, output_padding: int = 0, conv_only: bool = False,
) -> nn.Sequential:
    """MONAI's ``Convolution`` block as these networks use it: a convolution ("conv"), then "adn" holding the
    norm ("N": "batch" or "instance") and the activation ("A": "relu" or ("leakyrelu", slope)). The same
    modules under the same names, so the same state-dict keys and the same arithmetic, without importing MONAI.
    `padding` defaults to "same" for odd kernels, as MONAI's."""
    padding = (kernel_size - 1) // 2 if padding is None else padding
    block = nn.Sequential()
    if transposed:
        conv = CONV_TRANSPOSE[spatial_dims](in_channels, out_channels, kernel_size, stride=stride, padding=padding, output_padding=output_padding, bias=bias)
    else:
        conv = CONV[spatial_dims](in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    block.add_module("conv", conv)
    if conv_only or (norm is None and act is None):
        return block
    adn = nn.Sequential()
    if norm is not None:
        norms = {"batch": BATCH_NORM, "instance": INSTANCE_NORM}
        adn.add_module("N", norms[norm.lower()][spatial_dims](out_channels))
    if act is not None:
        name, slope = (act, None) if isinstance(act, str) else act
        adn.add_module("A", nn.ReLU() if name.lower() == "relu" else nn.LeakyReLU(negative_slope=slope))
    block.add_module("adn", adn)
    return block
