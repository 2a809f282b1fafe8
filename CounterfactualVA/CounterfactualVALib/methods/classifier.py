"""Classifier saliency baselines: CAM, Grad-CAM, integrated gradients and occlusion on one CNN classifier.

The classifier (:class:`~CounterfactualVALib.networks.classifier.ConvClassifier`: PatchGAN-style conv blocks,
global average pooling, a dense layer with 2 logits; vant-gan.txt section 5) is trained with cross-entropy on
the loop's normal (label 0) and abnormal (label 1) images, concatenated. It makes no counterfactual: the map
is a saliency map for the abnormal class, computed by MONAI (`monai.visualize.CAM`, `GradCAM`,
`OcclusionSensitivity`) or Captum (`captum.attr.IntegratedGradients`), not by hand-written attribution code.

Target score. All explainers explain the same number: the log-odds of abnormal against normal,
l_abnormal - l_normal (= logit(P(abnormal)) with a 2-way softmax). A single raw logit would carry a part
common to both classes that the softmax ignores. Sign: positive = evidence for abnormal (for
``target="normal"`` the score is negated, positive = evidence for normal).

* ``cam``: the dense layer applied at every location of the last conv feature map (CAM, Zhou et al.),
  upsampled linearly to the grid. Signed; its spatial mean (before upsampling) is the log-odds itself.
* ``gradcam``: Grad-CAM on the same layer (gradient-weighted feature maps, ReLU), upsampled. Non-negative.
* ``integrated_gradients``: Captum IG of the log-odds from a constant baseline image, ``ig_baseline`` =
  -1 by default: the darkest intensity of the model range, i.e. the "black image" baseline of the IG paper
  and of medXGAN's comparison (0 would be mid-grey in our [-1, 1] convention, not an absence of signal).
  Signed; sums (approximately) to log-odds(x) - log-odds(baseline).
* ``occlusion``: MONAI occlusion sensitivity; the map is log-odds(x) - log-odds(x with a patch around the
  voxel occluded), so positive where hiding the region lowers the evidence for abnormal. Patch filled with
  the image mean (``occlusion_mode="mean_img"``, as medXGAN's perturbation experiment), patch size
  ``occlusion_mask_size`` (0 = automatic: about 1/8 of the smallest grid side in 2D, 1/4 in 3D, at least 4),
  windows overlapping by ``occlusion_overlap``. Cost: about (side / (mask * (1 - overlap)))**dims forward
  passes (64^3 with the automatic 16^3 patch: 343; with an 8^3 patch: 3,375).

Maps are left in their own units (no min-max rescaling: MONAI's default post-processing, which flips and
rescales to [0, 1], is replaced by the identity), so their sign means what is written above.

Model selection in the shared loop scores integrated-gradients maps (16 steps) against the ground truth, not
Grad-CAM maps (see :meth:`ClassifierBaseline.validation_map`).

The classifier also serves other code: :meth:`ClassifierBaseline.load_classifier` returns the frozen,
eval-mode network from a classifier model file (medXGAN's frozen classifier, the independent judge of
counterfactual validity); :meth:`ClassifierBaseline.build_classifier` rebuilds the architecture from the
file's configuration.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import torch
import torch.nn.functional as F

from ..method_options import OptionSpec
from ..networks import init_normal_weights
from ..networks.classifier import ConvClassifier, LogOdds
from .base import AttributionResult, Method, TrainingContext
from .shared_specs import adam_beta, learning_rate

EXPLAINERS = ("cam", "gradcam", "integrated_gradients", "occlusion")
_TARGETS = {"abnormal": 1, "normal": 0}
OCCLUSION_MODES = ("mean_img", "mean_patch", "gaussian")

_EXPLAINER_DESCRIPTIONS = {
    "cam": "CAM (class activation map of the log-odds, MONAI CAM, linearly upsampled)",
    "gradcam": "Grad-CAM of the log-odds (MONAI GradCAM, ReLU: non-negative, linearly upsampled)",
    "integrated_gradients": "integrated gradients of the log-odds from a constant baseline image (Captum)",
    "occlusion": "occlusion sensitivity: log-odds(input) - log-odds(input with the patch around the voxel occluded) (MONAI)",
}


def _identity(x):
    return x


def integrated_gradients(classifier: torch.nn.Module, x: torch.Tensor, class_idx: int = 1, steps: int = 50, baseline: float = -1.0) -> torch.Tensor:
    """Captum integrated gradients of a 2-logit classifier's log-odds (sign per `class_idx`) from a constant
    baseline image; also used to compare medXGAN's latent IG with pixel IG on the same frozen classifier."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(LogOdds(classifier).eval())
    inputs = x.detach().float().requires_grad_(True)
    # bound memory: at most ~16 interpolated images (3D grids) per forward pass
    batch = max(1, min(steps, 16)) * len(x)
    return ig.attribute(inputs, baselines=baseline, target=class_idx, n_steps=steps, internal_batch_size=batch)


class ClassifierBaseline(Method):
    name = "classifier"
    title = "Classifier saliency (CAM / Grad-CAM / integrated gradients / occlusion)"
    outputs = ("attribution", "mask", "class_probability")
    inference_networks = ("classifier",)
    options = (
        OptionSpec(
            "explainer", "choice", "gradcam", "Explainer",
            "cam: class activation map; gradcam: Grad-CAM; integrated_gradients: from a constant baseline image; "
            "occlusion: change of the log-odds when a patch is occluded.",
            choices=EXPLAINERS, aliases=(("grad_cam", "gradcam"), ("ig", "integrated_gradients")),
        ),
        OptionSpec(
            "target", "choice", "abnormal", "Explained class", "abnormal: positive = evidence for abnormal; normal: the sign flipped.",
            choices=tuple(_TARGETS),
        ),
        OptionSpec(
            "ig_steps", "int", 50, "Integrated-gradient steps", "Interpolation steps from the baseline (integrated_gradients only).",
            minimum=1, maximum=2000,
        ),
        OptionSpec(
            "ig_baseline", "float", -1.0, "IG baseline value",
            "Constant baseline image in model intensities, -1 = the background (integrated_gradients only).",
            minimum=-10.0, maximum=10.0, step=0.1, decimals=3, advanced=True,
        ),
        OptionSpec(
            "occlusion_mask_size", "int", 0, "Occlusion patch size", "Side of the occluded patch in model voxels; 0: automatic (occlusion only).",
            minimum=0, maximum=512,
        ),
        OptionSpec(
            "occlusion_overlap", "float", 0.5, "Occlusion overlap", "Overlap of neighbouring patches, 0 to below 1 (occlusion only).",
            minimum=0.0, maximum=0.95, step=0.05, decimals=2, advanced=True,
        ),
        OptionSpec(
            "occlusion_mode", "choice", "mean_img", "Occlusion fill",
            "What fills the occluded patch: the image mean, the patch mean, or a Gaussian blur (occlusion only).",
            choices=OCCLUSION_MODES, advanced=True,
        ),
    )
    default_config = {
        "channels": 64,  # first conv block's width (PatchGAN ndf)
        "n_layers": 3,  # stride-2 conv blocks kept from the PatchGAN (64, 128, 256)
        "norm": "batch",
        "max_channels": 512,
        "dropout": 0.0,
        "lr": 1e-4,
        "beta1": 0.9,
        "weight_decay": 0.0,
    }
    config_specs = (
        OptionSpec("channels", "int", 64, minimum=1, tooltip="width of the first conv block (PatchGAN ndf), doubled per block up to max_channels"),
        OptionSpec("n_layers", "int", 3, minimum=1, maximum=10,
                   tooltip="stride-2 conv blocks (each halves the grid; CAM and Grad-CAM are read at grid / 2**n_layers)"),
        OptionSpec("norm", "choice", "batch", choices=("batch", "instance", "none"),
                   tooltip="normalisation of the conv blocks after the first (batch localises best, see networks/classifier.py)"),
        OptionSpec("max_channels", "int", 512, minimum=1, tooltip="upper bound of the conv blocks' widths"),
        OptionSpec("dropout", "float", 0.0, minimum=0.0, maximum=0.99, tooltip="dropout before the dense layer while training (0: none)"),
        learning_rate("lr", 1e-4, "the classifier"),
        adam_beta("beta1", 0.9, 1),
        OptionSpec("weight_decay", "float", 0.0, minimum=0.0, maximum=1.0, tooltip="Adam weight decay (L2 penalty on the weights)"),
    )
    training_defaults = {"batch_size": 16}
    map_description = (
        "classifier saliency for the abnormal class, no counterfactual; explains the log-odds "
        "l_abnormal - l_normal; positive = evidence for abnormal (explainer chosen per run, default Grad-CAM)"
    )

    # --- networks -------------------------------------------------------------------------------
    @staticmethod
    def build_classifier(spatial_dims: int, config: dict) -> ConvClassifier:
        """The classifier network described by a classifier configuration (defaults for missing keys)."""
        c = {**ClassifierBaseline.default_config, **(config or {})}
        return ConvClassifier(
            spatial_dims,
            in_channels=1,
            out_channels=2,
            channels=int(c["channels"]),
            n_layers=int(c["n_layers"]),
            norm=c["norm"],
            max_channels=int(c["max_channels"]),
            dropout=float(c["dropout"]),
        )

    def build_networks(self, training: bool):
        return {"classifier": init_normal_weights(self.build_classifier(self.spatial_dims, self.config))}

    @staticmethod
    def load_classifier(model_path: str | os.PathLike, device: torch.device | str = "cpu", return_metadata: bool = False):
        """The trained classifier network of a classifier model file: eval mode, parameters frozen.

        Input: (B, 1, *grid) in [-1, 1] on the model grid of the file's preprocessing; output: 2 logits
        (0 = normal, 1 = abnormal). With ``return_metadata`` returns ``(metadata, network)`` so callers can
        check the grid (``metadata.preprocessing``) and the architecture (``metadata.method_config``).
        """
        from . import load_method

        metadata, method = load_method(model_path, torch.device(device), expected_method="classifier")
        net = method.networks["classifier"].eval()
        net.requires_grad_(False)
        return (metadata, net) if return_metadata else net

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self, total_steps: int):
        c = self.config
        optimizer = torch.optim.Adam(
            self.networks["classifier"].parameters(), lr=c["lr"], betas=(c["beta1"], 0.999), weight_decay=c["weight_decay"]
        )
        return {"classifier": (optimizer, None)}

    def training_step(self, batch, ctx: TrainingContext):
        x_n, x_a = batch["normal"], batch["abnormal"]
        x = torch.cat([x_n, x_a], 0)
        y = torch.cat([torch.zeros(len(x_n), dtype=torch.long), torch.ones(len(x_a), dtype=torch.long)]).to(x.device)
        with ctx.autocast():
            logits = self.networks["classifier"](x)
            loss = F.cross_entropy(logits.float(), y)
        ctx.optimize("classifier", loss)
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        return {"loss_ce": loss.item(), "train_accuracy": accuracy.item()}

    # --- inference ------------------------------------------------------------------------------
    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(abnormal | x), shape (B,)."""
        with torch.no_grad():
            return torch.softmax(self.networks["classifier"](x).float(), dim=1)[:, 1]

    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        o = options  # checked and completed by Method.check_options
        explainer = o["explainer"]
        class_idx = _TARGETS[o["target"]]
        net = self.networks["classifier"]
        was_training = net.training
        net.eval()
        try:
            with torch.enable_grad():  # the loop validates under no_grad; gradient explainers need autograd
                if explainer in ("cam", "gradcam"):
                    amap = self._cam(x, explainer, class_idx)
                elif explainer == "integrated_gradients":
                    amap = self._integrated_gradients(x, class_idx, int(o["ig_steps"]), float(o["ig_baseline"]))
                else:
                    amap = self._occlusion(x, class_idx, int(o["occlusion_mask_size"]), float(o["occlusion_overlap"]), o["occlusion_mode"])
            probability = self.probability(x)
        finally:
            net.train(was_training)
        target_text = "abnormal" if class_idx == 1 else "normal (sign flipped: positive = evidence for normal)"
        self.map_description = (
            f"classifier saliency for the {target_text} class, no counterfactual; explains the log-odds "
            f"l_abnormal - l_normal; positive = evidence for abnormal; {_EXPLAINER_DESCRIPTIONS[explainer]}"
        )
        scalars = {"class_probability": float(probability[0])} if len(probability) == 1 else {
            f"class_probability_{i}": float(p) for i, p in enumerate(probability)
        }
        return AttributionResult(attribution=amap.detach().to(x.dtype), counterfactual=None, scalars=scalars)

    def validation_map(self, x: torch.Tensor) -> torch.Tensor:
        """Integrated gradients (16 steps) for the loop's model selection. Not Grad-CAM: its ReLU makes every
        map exactly zero while the evidence is still carried by negative activations (typical early in
        training), and a run of all-zero scores ties and freezes the selection at the first validation."""
        return self.attribute(x, explainer="integrated_gradients", ig_steps=16).attribution

    # --- explainers -----------------------------------------------------------------------------
    def _cam(self, x: torch.Tensor, explainer: str, class_idx: int) -> torch.Tensor:
        from monai.visualize import CAM, GradCAM

        # MONAI registers hooks it never removes: attach them to a throw-away copy, not the model itself.
        twin = LogOdds(copy.deepcopy(self.networks["classifier"])).eval()
        twin.requires_grad_(True)  # Grad-CAM's backward hooks need a graph even when the model is frozen
        layer = f"net.{ConvClassifier.target_layer}"
        x = x.detach().float().requires_grad_(explainer == "gradcam")
        if explainer == "cam":
            cam = CAM(twin, target_layers=layer, fc_layers=lambda model: (lambda f: LogOdds.contrast(model.net.fc(f))), postprocessing=_identity)
            with torch.no_grad():
                return cam(x, class_idx=torch.full((len(x),), class_idx, dtype=torch.long, device=x.device))
        gradcam = GradCAM(twin, target_layers=layer, postprocessing=_identity)
        return gradcam(x, class_idx=class_idx)

    def _integrated_gradients(self, x: torch.Tensor, class_idx: int, steps: int, baseline: float) -> torch.Tensor:
        return integrated_gradients(self.networks["classifier"], x, class_idx, steps, baseline)

    def _occlusion(self, x: torch.Tensor, class_idx: int, mask_size: int, overlap: float, mode) -> torch.Tensor:
        from monai.visualize import OcclusionSensitivity

        spatial = x.shape[2:]
        if mask_size <= 0:  # 1/8 of the side in 2D, 1/4 in 3D (64^3: 343 forward passes instead of 3,375)
            mask_size = max(4, int(math.floor(min(spatial) / (8 if len(spatial) == 2 else 4) + 0.5)))
        mask_size = min(mask_size, min(spatial))
        model = LogOdds(self.networks["classifier"]).eval()
        occlusion = OcclusionSensitivity(model, mask_size=mask_size, n_batch=16, verbose=False, mode=mode, overlap=overlap, activate=False)
        maps = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
            for image in x.detach().float():
                image = image[None]
                score = model(image)[:, class_idx]
                occluded, _ = occlusion(image)
                occluded = occluded.as_tensor() if hasattr(occluded, "as_tensor") else occluded
                maps.append(score.view(1, 1, *([1] * len(spatial))) - occluded[:, class_idx : class_idx + 1])
        return torch.cat(maps, 0)


__all__ = ["ClassifierBaseline", "EXPLAINERS"]
