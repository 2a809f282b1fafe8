"""What every method provides, for inference and for the shared training loop.

A method is one module: its networks, its training step (losses and optimizer updates), and its
attribution, and the declarations of what it accepts (``options`` at attribution time, ``default_config`` and
``config_specs`` for training: :class:`~CounterfactualVALib.method_options.OptionSpec`). The training library
drives `training_step` from one loop for all methods (data, AMP, checkpoints, resume, logs, DDP); the inference
pipeline calls `attribute`. The base class checks every configuration and every `attribute` call against the
declarations before any computation. Adding a method is adding one file and one line in the registry
(:mod:`CounterfactualVALib.methods`), or :func:`~CounterfactualVALib.methods.register_method` for a class
defined elsewhere.

Tensors are (batch, channel, *spatial) on the model grid, intensities in [-1, 1].
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..method_options import OptionSpec, check_values, config_schema


#: the weight average of an inference network `name` is the network `name + AVERAGE_SUFFIX`
AVERAGE_SUFFIX = "_ema"


@dataclass
class AttributionResult:
    """Outputs on the model grid (batch, 1, *spatial).

    attribution: signed map, counterfactual minus input unless the method says otherwise in `map_description`.
    extras: further maps on the same grid, each with a kind in `extra_kinds` ("difference": signed, in image
        units; "probability": values in [0, 1]; "intensity": an image like the input).
    scalars: per-image numbers (e.g. class probability).
    series: image sequences (time, batch, 1, *spatial), e.g. a latent interpolation, with `series_values`
        giving one number per frame (e.g. the classifier output).
    """

    attribution: torch.Tensor
    counterfactual: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_kinds: dict[str, str] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    series: dict[str, torch.Tensor] = field(default_factory=dict)
    series_values: dict[str, list] = field(default_factory=dict)


class TrainingContext:
    """What the shared loop gives a method's training step: device, precision, optimisation, randomness.

    This is the whole API a method may use during training:

    * ``device``, ``step`` (0-based, of this update), ``total_steps`` (the run's length: schedules, stages);
    * ``autocast()``: the context to run forward passes in (bf16 on CUDA unless disabled, else nothing);
    * ``optimize(name, loss, clip_grad_norm=None)``: backward, gradients averaged across DDP ranks, optional
      clipping, then a step of the optimizer `name` from ``configure_optimizers`` (methods never deal with AMP
      or distribution themselves);
    * ``randn(*shape)`` / ``rand(*shape)`` and ``generator``: this step's random numbers (reproducible, resumed
      runs included);
    * ``sample_batch()``: a further batch of the training data, like the step's (for methods that update a
      network several times per step, e.g. VA-GAN's critic).
    """

    def __init__(
        self,
        device: torch.device,
        optimizers: dict[str, torch.optim.Optimizer],
        amp_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        all_reduce: Callable[[list[torch.Tensor]], None] | None = None,
    ):
        self.device = device
        self.optimizers = optimizers
        self.amp_dtype = amp_dtype
        self.generator = generator or torch.Generator().manual_seed(0)
        self._all_reduce = all_reduce
        self.step = 0
        self.total_steps = 1
        self.sample_batch: Callable[[], dict[str, torch.Tensor]] | None = None  # set by the loop for each step

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def optimize(self, name: str, loss: torch.Tensor, clip_grad_norm: float | None = None) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self._all_reduce is not None:
            self._all_reduce([p.grad for p in params])
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        optimizer.step()

    def randn(self, *shape: int) -> torch.Tensor:
        """Normal noise from the step's generator (reproducible across resume), on the training device."""
        return torch.randn(*shape, generator=self.generator).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)


class Method:
    """Base class. Subclasses set the class attributes and implement the marked methods."""

    name: str = ""
    title: str = ""
    #: what `attribute` can produce, so a user interface offers exactly that
    outputs: tuple[str, ...] = ("counterfactual", "attribution", "mask")
    #: networks kept in the model file
    inference_networks: tuple[str, ...] = ()
    #: options `attribute` accepts (type, default, range or choices, help): checked before every call, written
    #: into the model file, shown by the Slicer panel and `counterfactualva methods`
    options: tuple[OptionSpec, ...] = ()
    #: training configuration keys with their defaults; `config_specs` describes those that need more than
    #: their default's type (a range, choices, help); together they give `config_schema`
    default_config: dict[str, Any] = {}
    config_specs: tuple[OptionSpec, ...] = ()
    #: derived from the declarations above by the base class (do not set): name -> default, and all config specs
    attribute_options: dict[str, Any] = {}
    config_schema: tuple[OptionSpec, ...] = ()
    #: training defaults the loop uses unless overridden (steps, batch size, ...)
    training_defaults: dict[str, Any] = {}
    map_description: str = "counterfactual minus input"
    #: whether training on patches (cropped at one position in both domains) is meaningful: every network
    #: fully convolutional and free of image-wide statistics, so the whole volume can be processed at inference
    supports_patches: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "attribute_options" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: declare attribution options as `options = (OptionSpec(...), ...)`, not attribute_options")
        cls.attribute_options = {spec.name: spec.default for spec in cls.options}
        cls.config_schema = config_schema(cls.default_config, cls.config_specs)
        attribute = cls.__dict__.get("attribute")
        if attribute is not None and not getattr(attribute, "checks_options", False):

            @functools.wraps(attribute)
            def checked_attribute(self, x, **options):
                return attribute(self, x, **self.check_options(options))

            checked_attribute.checks_options = True
            cls.attribute = checked_attribute

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """Attribution options checked against `options` (unknown names and bad values refused, the option
        named) and completed with the defaults."""
        return check_values(cls.name, "options", cls.options, options)

    @classmethod
    def check_config(cls, config: dict | None) -> dict:
        """A training configuration checked against `config_schema` and completed with the defaults."""
        return check_values(cls.name, "configuration keys", cls.config_schema, config or {})

    @classmethod
    def prepare_config(cls, config: dict, preprocessing) -> dict:
        """The training configuration completed from the preprocessing (a ``PreprocessingConfig``), before the
        networks are built: for methods whose networks depend on the model grid. Default: unchanged."""
        return config

    def __init__(self, spatial_dims: int, config: dict | None = None, training: bool = False):
        self.spatial_dims = spatial_dims
        self.config = self.check_config(config)
        self.training = training
        self.networks = nn.ModuleDict(self.build_networks(training))
        self.stateful: dict[str, Any] = {}  # e.g. image pools: saved with training checkpoints
        #: inference networks that keep a weight average (config "ema_decay"; the training loop updates it)
        self.averaged_networks: tuple[str, ...] = ()
        if training and self.config.get("ema_decay", 0.0) > 0:
            # a GAN's networks oscillate around what they learn (a 3D VANT-GAN's validation NCC 0.20, then 0.04
            # a hundred steps later); the average of their recent weights is steadier. Networks of their own,
            # so the checkpoint carries them and resume stays exact; never optimised. A frozen network (medXGAN's
            # classifier) is its own average and gets none.
            self.averaged_networks = tuple(
                name for name in self.inference_networks if any(p.requires_grad for p in self.networks[name].parameters())
            )
            for name in self.averaged_networks:
                self.networks[name + AVERAGE_SUFFIX] = copy.deepcopy(self.networks[name]).requires_grad_(False)

    # --- to implement -------------------------------------------------------------------------
    def build_networks(self, training: bool) -> dict[str, nn.Module]:
        """All networks when `training`, otherwise only `inference_networks`."""
        raise NotImplementedError

    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        raise NotImplementedError

    def configure_optimizers(self, total_steps: int) -> dict[str, tuple[torch.optim.Optimizer, Callable[[int], float] | None]]:
        """name -> (optimizer, LR multiplier as a function of the step, or None for a constant rate)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], ctx: TrainingContext) -> dict[str, float]:
        """One update of every network; returns scalar losses for the logs."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    def to(self, device: torch.device | str, memory_format: torch.memory_format | None = None) -> "Method":
        self.networks.to(device)
        if memory_format is not None:
            self.networks.to(memory_format=memory_format)
        return self

    def eval(self) -> "Method":
        self.networks.eval()
        return self

    def train(self) -> "Method":
        self.networks.train()
        return self

    # --- weight average (config key "ema_decay": the training loop updates it after every step) --------
    @torch.no_grad()
    def update_averages(self) -> None:
        """Move the averaged inference networks towards the live ones (exponential moving average of the
        parameters; buffers such as batch-norm statistics are copied)."""
        if not self.averaged_networks:
            return
        weight = 1.0 - float(self.config["ema_decay"])
        for name in self.averaged_networks:
            live, average = self.networks[name], self.networks[name + AVERAGE_SUFFIX]
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in average.parameters()):
                average.load_state_dict(live.state_dict())  # a lazy layer sized by the first batch
                continue
            for a, p in zip(average.parameters(), live.parameters()):
                a.lerp_(p.detach(), weight)
            for a, b in zip(average.buffers(), live.buffers()):
                a.copy_(b)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the inference networks are their weight averages (validation and the model file
        use them); the live networks come back afterwards. Without an average: unchanged."""
        if not self.averaged_networks:
            yield self
            return
        names = [(n, n + AVERAGE_SUFFIX) for n in self.averaged_networks]

        def swap():
            for live, average in names:
                self.networks[live], self.networks[average] = self.networks[average], self.networks[live]

        swap()
        try:
            yield self
        finally:
            swap()

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        with self.averaged_weights():
            return {
                f"{net}.{key}": value
                for net in self.inference_networks
                for key, value in self.networks[net].state_dict().items()
            }

    def load_inference_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for net in self.inference_networks:
            prefix = f"{net}."
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.networks[net].load_state_dict(part, strict=True)

    def training_state(self) -> dict[str, torch.Tensor]:
        """Method state beyond weights and optimizers that a resumed run needs (e.g. image pools)."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        pass

    def validation_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map used for model selection (NCC/Dice against ground truth on held-out subjects)."""
        return self.attribute(x).attribution
