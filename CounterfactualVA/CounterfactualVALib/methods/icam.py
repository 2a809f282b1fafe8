"""ICAM (Bass et al., NeurIPS 2020: interpretable classification via disentangled representations and feature
attribution mapping; icam.txt, reference-notes "ICAM").

A VAE-GAN translates between the classes through two latent spaces: a class-irrelevant *content* code z_c = E_c(x)
(shared by both classes; a content discriminator D_c tries to tell the class from it, E_c is pushed to make it
undecidable) and a class-relevant spatial *attribute* code z_a ~ N(mu, sigma^2), (mu, log sigma^2) = E_a(x), with a
linear classifier on it. The generator G(z_c, z_a) reconstructs an image when both codes come from it and
translates it when the attribute code comes from the other class. Networks: :mod:`..networks.icam`.

Training step (one normal image x, label 0, and one abnormal image y, label 1, per step by default):

* reconstructions G(z_c(x), z_a(x)), G(z_c(y), z_a(y)): L1 100 + L2 100 (image losses are means over the
  voxels of both images of a pair, the reference's scale);
* swaps u = G(z_c(x), z_a(y)) (x made abnormal), v = G(z_c(y), z_a(x)) (y made normal); the cross cycle
  re-encodes them and swaps back, G(z_c(u), z_a(v)) ~ x and G(z_c(v), z_a(u)) ~ y: L1 100 + L2 100;
* feature-attribution maps u - x and v - y kept small: L1 10 (icam.txt: L^M_1 on M_x, M_y);
* random attribute codes of the *opposite* class, rejection-sampled with the latent classifier (a batch of
  candidates z ~ N(0, I) drawn at once, accepted when the classifier gives the wanted class; when too few are
  accepted the best-scoring candidates fill in, so no code is ever left at zero): G(z_c(x), z_1) and
  G(z_c(y), z_0); latent regression |mu(E_a(G(z_c, z_r))) - z_r|: L1 1;
* two domain discriminators, D1 on the swaps and D2 on the random-code translations, each with a real/fake patch
  head (BCE with logits: GAN weight 1 for D and G) and a 2-class head trained on real images (weight 1) and used
  on the translations for G with the intended class (weight 5);
* attribute classification of mu(x), mu(y) (the reference classifies the means of real images and the sampled
  codes only during rejection sampling): cross-entropy on two logits, weight 10 (the public code's softmax
  before BCE-with-logits is not reproduced);
* content adversarial: D_c learns the class of z_c (BCE with logits, weight 1); E_c is pushed towards 0.5/0.5
  (BCE against 0.5, weight 1); mean(z_c^2) 0.01;
* KL(N(mu, sigma^2) || N(0, I)) summed over the latent and over the two images of a pair: 0.01.

GAN and class losses are averaged over the images of a batch (the reference sums the GAN term over them).

``class_warmup_steps`` (0: the paper) trains only the classifiers for the first steps: the attribute encoder
with its latent classifier (class loss + KL) and the domain discriminators' class heads on real images. Every
other term needs them: the swap changes the image only where the attribute code carries the class, and the
generator's class loss only pushes towards a disease the discriminators can see. On a subtle 3D effect at a CPU
budget none of them left chance level in 1,200 full steps (loss ln 2 throughout; the attribute means of 40 validation
subjects had a standard deviation of 0.002), so the map stayed the autoencoder's reconstruction error. Warmed up
alone (batch 2 + 2, lr 1e-3), the latent classifier left chance after about 2,500 steps and reached training
accuracy 0.97 by 3,600 (session 14); the discriminators' class heads, which average their features over the
whole grid, stayed at chance. A warm-up step cost 0.24 s there, a full step (six decodings and their
discriminators) 1.5 s.

Optimisers: Adam lr 1e-4, betas (0.5, 0.999), weight decay 1e-4 for encoders + generator + classifier and for the
two domain discriminators; the content discriminator lr 4e-5 with gradient-norm clipping at 5. The learning rate
is constant for the first half and decays linearly to zero over the second (`decay_start_fraction`; the public
code defined such a scheduler but never stepped it). Update order per step: D_c, then D1 + D2, then E_c + E_a +
classifier + G.

Inference (`attribute`): E_c(x) once; P(abnormal) from the classifier on mu(E_a(x)); N candidate-filtered random
codes of the target class (accepted when P(target) > p_accept, 0.9 by default; drawn in batches until N are
accepted or `max_candidates` have been tried, then the best-scoring fill in) decoded in ONE batch:
maps_i = G(z_c, z_i) - x. The counterfactual is the first sample, G(z_c, z_1) (the paper's single-swap
translation), the attribution counterfactual - x; extras "icam_mean" (mean of the maps) and "icam_std" (their
per-voxel standard deviation, in image units, >= 0).

The attribute latent's size follows the model grid (grid / 2**(len(attribute_channels) + 1) per axis: grid / 16
by default), so the linear
classifier's input size depends on the grid: config ``grid_size`` (ITK order x, y[, z], like ``--size``). Left
at None, it is taken from the first training batch (the classifier is a lazy linear layer until then) and written
into the configuration saved with the model file. Grids whose sides are not multiples of 2**levels are padded
(replicate) inside the method and the outputs cropped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..method_options import OptionSpec
from ..networks import init_normal_weights, linear_decay_schedule
from ..networks.icam import (
    AttributeEncoder,
    ContentDiscriminator,
    ContentEncoder,
    DomainDiscriminator,
    Generator,
    LatentClassifier,
    crop_to,
    latent_grid,
    pad_to_multiple,
)
from .base import AttributionResult, Method, TrainingContext
from .losses import AdversarialLoss, bce_with_logits, gaussian_kl, pair_l1, pair_l2
from .shared_specs import adam_beta, decay_start_fraction, learning_rate, weight_average

_DIRECTIONS = ("to_normal", "to_abnormal", "auto")
_ADVERSARIAL = AdversarialLoss("bce")  # both domain discriminators (the reference's BCE-with-logits GAN)


def select_codes(probabilities: torch.Tensor, n: int, threshold: float) -> tuple[torch.Tensor, int]:
    """Rejection sampling over a batch of candidates.

    `probabilities`: P(target class) of each candidate, in draw order. Returns the indices of `n` candidates:
    the accepted ones (P > threshold) first, in draw order, then, if fewer than `n` were accepted, the rejected
    ones with the highest P(target). Also returns how many of the chosen were accepted.
    """
    k = probabilities.shape[0]
    if n > k:
        raise ValueError(f"asked for {n} codes from {k} candidates")
    accepted = probabilities > threshold
    order_rejected = torch.argsort(probabilities, descending=True, stable=True)
    rank = torch.empty(k, dtype=torch.long, device=probabilities.device)
    rank[order_rejected] = torch.arange(k, device=probabilities.device)
    key = torch.where(accepted, torch.arange(k, device=probabilities.device), k + rank)
    chosen = torch.argsort(key)[:n]
    return chosen, int(accepted[chosen].sum())


class ICAM(Method):
    name = "icam"
    title = "ICAM"
    outputs = ("counterfactual", "attribution", "mask", "class_probability", "icam_mean", "icam_std")
    inference_networks = ("content_encoder", "attribute_encoder", "generator", "classifier")
    options = (
        OptionSpec(
            "samples", "int", 20, "Latent samples",
            "Attribute codes drawn from the target class; the map is the first translation, icam_mean / icam_std "
            "summarise all of them (more samples: steadier mean and std, longer run).", minimum=1, maximum=1000,
        ),
        OptionSpec(
            "direction", "choice", "to_normal", "Direction",
            "to_normal: translate the scan to the normal class (its healthy counterpart); to_abnormal: the other "
            "way; auto: towards the class the classifier does not predict.", choices=_DIRECTIONS,
        ),
        OptionSpec(
            "p_accept", "float", 0.9, "Acceptance probability",
            "A drawn code is kept when the latent classifier gives it at least this probability of the target "
            "class (rejection sampling); when too few pass, the most probable ones are used.",
            minimum=0.0, maximum=1.0, step=0.05, decimals=3, advanced=True,
        ),
        OptionSpec(
            "max_candidates", "int", 20000, "Maximum candidates", "At most this many codes are drawn while looking for accepted ones.",
            minimum=1, maximum=10_000_000, advanced=True,
        ),
        OptionSpec("seed", "int", 0, "Random seed", "Seed of the random draws (same seed, same result).", minimum=0, maximum=2**31 - 1, advanced=True),
        OptionSpec(
            "map_reference", "choice", "input", "Map reference",
            "input: maps are G(z_c, z) - input (the paper). reconstruction: maps are G(z_c, z) - G(z_c, mu), the "
            "subject's own reconstruction subtracted, so that what the autoencoder cannot reproduce (texture, noise) "
            "cancels out; the counterfactual is then the input plus that map.",
            choices=("input", "reconstruction"), advanced=True,
        ),
    )
    map_description = (
        "counterfactual minus input: G(z_c(input), z) - input for one attribute code z rejection-sampled from the "
        "target class (ICAM single-swap translation); icam_mean / icam_std: mean and per-voxel standard deviation "
        "of G(z_c, z_i) - input over the accepted samples"
    )
    default_config = {
        # networks
        "grid_size": None,  # model grid, ITK order (x, y[, z]) like --size; None: taken from the first batch
        "content_channels": [16, 32, 64],  # stem, then one stride-2 level per further entry: z_c at grid / 4
        "content_res_blocks": 4,
        "content_noise_std": 1.0,
        "attribute_channels": [16, 32, 48],  # stride-2 stem, mean-pool blocks, mean-pool heads: z_a at grid / 2**(3+1)
        "latent_channels": 1,
        "generator_code_channels": 16,  # the attribute map's features concatenated with z_c
        "generator_res_blocks": 3,
        "dis_channels": 16,
        "dis_layers": 4,
        "dis_max_channels": 256,
        "content_dis_channels": 64,
        "content_dis_layers": 3,
        # loss weights (reference-notes "ICAM")
        "lambda_rec_l1": 100.0,
        "lambda_rec_l2": 100.0,
        "lambda_cc_l1": 100.0,
        "lambda_cc_l2": 100.0,
        "lambda_gan": 1.0,
        "lambda_dis_cls": 1.0,
        "lambda_gen_cls": 5.0,
        "lambda_attr_cls": 10.0,
        "lambda_content_adv": 1.0,
        "lambda_kl": 0.01,
        "lambda_content_l2": 0.01,
        "lambda_latent": 1.0,
        "lambda_fa": 10.0,
        # rejection sampling during training
        "rejection_candidates": 64,
        "rejection_threshold": 0.5,
        # optimisation
        "lr": 1e-4,
        "beta1": 0.5,
        "beta2": 0.999,
        "weight_decay": 1e-4,
        "content_dis_lr": 4e-5,
        "content_dis_clip": 5.0,
        "decay_start_fraction": 0.5,
        "ema_decay": 0.0,
        "class_warmup_steps": 0,
    }
    config_specs = (
        OptionSpec(
            "grid_size", "list", None, tooltip="model grid, ITK order (x, y[, z]) like --size; none: taken from the preprocessing",
            nullable=True,
        ),
        OptionSpec("content_channels", "list", [16, 32, 64],
                   tooltip="content encoder widths: a stem, then one stride-2 level per further entry (z_c at grid / 4 by default)"),
        OptionSpec("content_res_blocks", "int", 4, minimum=0, maximum=100, tooltip="residual blocks at the end of the content encoder"),
        OptionSpec("content_noise_std", "float", 1.0, minimum=0.0,
                   tooltip="std of the Gaussian noise added to the content code while training (0: none)"),
        OptionSpec("attribute_channels", "list", [16, 32, 48],
                   tooltip="attribute encoder widths: stride-2 stem, then a mean-pool block per further entry (z_a at grid / 2**(entries + 1))"),
        OptionSpec("latent_channels", "int", 1, minimum=1, maximum=1024, tooltip="channels of the spatial attribute code z_a"),
        OptionSpec("generator_code_channels", "int", 16, minimum=1,
                   tooltip="channels the attribute code is lifted to before it joins the content code in the generator"),
        OptionSpec("generator_res_blocks", "int", 3, minimum=0, maximum=100, tooltip="residual blocks of the generator before its up-sampling"),
        OptionSpec("dis_channels", "int", 16, minimum=1, tooltip="width of the domain discriminators' first layer, doubled per layer"),
        OptionSpec("dis_layers", "int", 4, minimum=1, maximum=10, tooltip="stride-2 layers of the domain discriminators (each halves the grid)"),
        OptionSpec("dis_max_channels", "int", 256, minimum=1, tooltip="upper bound of the domain discriminators' widths"),
        OptionSpec("content_dis_channels", "int", 64, minimum=1, tooltip="width of the content discriminator's layers"),
        OptionSpec("content_dis_layers", "int", 3, minimum=1, maximum=10, tooltip="stride-2 layers of the content discriminator"),
        OptionSpec("lambda_rec_l1", "float", 100.0, minimum=0.0, tooltip="weight of the L1 reconstruction loss G(z_c(x), z_a(x)) ~ x"),
        OptionSpec("lambda_rec_l2", "float", 100.0, minimum=0.0, tooltip="weight of the L2 reconstruction loss"),
        OptionSpec("lambda_cc_l1", "float", 100.0, minimum=0.0, tooltip="weight of the L1 cross-cycle loss (swap the attribute codes twice, get the images back)"),
        OptionSpec("lambda_cc_l2", "float", 100.0, minimum=0.0, tooltip="weight of the L2 cross-cycle loss"),
        OptionSpec("lambda_gan", "float", 1.0, minimum=0.0, tooltip="weight of the domain discriminators' real/fake (BCE) loss, for them and for the generator"),
        OptionSpec("lambda_dis_cls", "float", 1.0, minimum=0.0, tooltip="weight of the domain discriminators' class loss on real images"),
        OptionSpec("lambda_gen_cls", "float", 5.0, minimum=0.0, tooltip="weight of the class loss the generator gets from the discriminators on its translations"),
        OptionSpec("lambda_attr_cls", "float", 10.0, minimum=0.0, tooltip="weight of the latent classifier's cross-entropy on the attribute means"),
        OptionSpec("lambda_content_adv", "float", 1.0, minimum=0.0, tooltip="weight of the content adversarial loss (the class must not be readable from z_c)"),
        OptionSpec("lambda_kl", "float", 0.01, minimum=0.0, tooltip="weight of KL(N(mu, sigma^2) || N(0, I)) on the attribute codes"),
        OptionSpec("lambda_content_l2", "float", 0.01, minimum=0.0, tooltip="weight of mean(z_c^2), which keeps the content code small"),
        OptionSpec("lambda_latent", "float", 1.0, minimum=0.0, tooltip="weight of the latent regression |mu(E_a(G(z_c, z))) - z| for random attribute codes z"),
        OptionSpec("lambda_fa", "float", 10.0, minimum=0.0, tooltip="weight of the L1 penalty on the feature-attribution maps (translation minus input)"),
        OptionSpec("rejection_candidates", "int", 64, minimum=1, maximum=1_000_000,
                   tooltip="random attribute codes drawn at once during training, of which those the classifier accepts are used"),
        OptionSpec("rejection_threshold", "float", 0.5, minimum=0.0, maximum=1.0,
                   tooltip="a drawn code is accepted for training when the latent classifier gives its class more than this"),
        learning_rate("lr", 1e-4, "the encoders, generator, classifier and domain discriminators"),
        adam_beta("beta1", 0.5, 1),
        adam_beta("beta2", 0.999, 2),
        OptionSpec("weight_decay", "float", 1e-4, minimum=0.0, maximum=1.0, tooltip="Adam weight decay of every network"),
        learning_rate("content_dis_lr", 4e-5, "the content discriminator"),
        OptionSpec("content_dis_clip", "float", 5.0, minimum=1e-6, tooltip="gradient-norm clipping of the content discriminator's updates"),
        decay_start_fraction(),
        weight_average(),
        OptionSpec(
            "class_warmup_steps", "int", 0, minimum=0,
            tooltip="first training steps that train only the classifiers (attribute encoder + latent classifier, the "
            "domain discriminators' class heads on real images), so that the swap has a class code to carry (0: the paper)",
        ),
    )
    training_defaults = {"batch_size": 1}

    # --- networks -------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        """Halvings from the image grid to the attribute latent's grid."""
        return len(self.config["attribute_channels"]) + 1

    @property
    def multiple(self) -> int:
        """Grid sides must be multiples of this (inputs are padded up to it)."""
        return 2 ** max(self.levels, len(self.config["content_channels"]) - 1)

    def _grid_tensor_order(self) -> tuple[int, ...] | None:
        grid = self.config["grid_size"]
        if grid is None:
            return None
        grid = [int(s) for s in grid]
        if len(grid) != self.spatial_dims:
            raise ValueError(f"icam: grid_size {grid} must have {self.spatial_dims} entries (x, y[, z])")
        return tuple(reversed(grid))

    def latent_shape(self) -> tuple[int, ...] | None:
        """(latent_channels, *latent grid) in tensor order, or None while the grid is unknown."""
        grid = self._grid_tensor_order()
        if grid is None:
            return None
        padded = [math.ceil(s / self.multiple) * self.multiple for s in grid]
        return (int(self.config["latent_channels"]), *latent_grid(padded, self.levels))

    @classmethod
    def prepare_config(cls, config: dict, preprocessing) -> dict:
        """The latent classifier's size follows the model grid: ``grid_size`` from the preprocessing when not given."""
        if config.get("grid_size") is None:
            config = {**config, "grid_size": list(preprocessing.size)}
        return config

    def build_networks(self, training: bool):
        c, dims = self.config, self.spatial_dims
        content_channels = [int(v) for v in c["content_channels"]]
        attribute_channels = [int(v) for v in c["attribute_channels"]]
        code_channels = int(c["generator_code_channels"])
        # up-blocks halve the width of the merged stream (content + code features) per level
        up_channels = [(content_channels[-1] + code_channels) // 2 ** (i + 1) for i in range(len(content_channels) - 1)]
        if len(content_channels) < 1 or len(attribute_channels) < 1:
            raise ValueError("icam: content_channels and attribute_channels need at least one entry")
        latent = self.latent_shape()
        in_features = None if latent is None else math.prod(latent)
        nets: dict[str, nn.Module] = {
            "content_encoder": init_normal_weights(
                ContentEncoder(dims, 1, content_channels, int(c["content_res_blocks"]), float(c["content_noise_std"]))
            ),
            "attribute_encoder": init_normal_weights(AttributeEncoder(dims, 1, attribute_channels, int(c["latent_channels"]))),
            "generator": init_normal_weights(
                Generator(
                    dims,
                    content_channels[-1],
                    int(c["latent_channels"]),
                    code_channels=code_channels,
                    up_channels=up_channels,
                    n_res_blocks=int(c["generator_res_blocks"]),
                )
            ),
            # default (Kaiming-uniform) init for the linear classifier; it may be lazy (grid unknown)
            "classifier": LatentClassifier(in_features),
        }
        if training:
            for name in ("d_swap", "d_random"):
                nets[name] = init_normal_weights(
                    DomainDiscriminator(dims, 1, int(c["dis_channels"]), int(c["dis_layers"]), int(c["dis_max_channels"]))
                )
            nets["d_content"] = init_normal_weights(
                ContentDiscriminator(dims, content_channels[-1], int(c["content_dis_channels"]), int(c["content_dis_layers"]))
            )
        return nets

    # --- model ----------------------------------------------------------------------------------
    def _check_grid(self, x: torch.Tensor) -> None:
        grid = self._grid_tensor_order()
        if grid is None:
            # remember the grid: it is saved with the model file, so inference builds the classifier eagerly
            self.config["grid_size"] = [int(s) for s in reversed(x.shape[2:])]
        elif tuple(x.shape[2:]) != grid:
            raise ValueError(
                f"icam: this model works on a {list(reversed(grid))} grid (x, y[, z]); got an image of "
                f"{list(reversed(x.shape[2:]))}. Preprocess the image to the model grid."
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_c, mu, logvar) of an image already padded to a multiple of `multiple`."""
        z_c = self.networks["content_encoder"](x)
        mu, logvar = self.networks["attribute_encoder"](x)
        return z_c, mu, logvar

    def classify(self, z_a: torch.Tensor) -> torch.Tensor:
        """Two logits (normal, abnormal) for attribute codes (B, latent_channels, *latent grid)."""
        return self.networks["classifier"](z_a.float())

    def sample_codes(
        self,
        n: int,
        target: int,
        latent: tuple[int, ...],
        threshold: float,
        candidates: int,
        max_candidates: int,
        randn,
    ) -> tuple[torch.Tensor, int, int]:
        """`n` attribute codes of class `target` by rejection sampling with the latent classifier.

        Candidates are drawn `candidates` at a time (with `randn(count, *latent)`) until `n` are accepted or
        `max_candidates` have been drawn; the best-scoring rejected candidates fill any shortfall. Returns
        (codes (n, *latent), accepted count, candidates drawn).
        """
        kept: list[torch.Tensor] = []
        kept_p: list[torch.Tensor] = []
        accepted_total = 0
        drawn = 0
        best_z, best_p = None, None
        with torch.no_grad():
            while True:
                count = max(candidates, n)
                z = randn(count, *latent)
                p = torch.softmax(self.classify(z), dim=1)[:, target]
                drawn += count
                ok = p > threshold
                if ok.any():
                    kept.append(z[ok])
                    kept_p.append(p[ok])
                    accepted_total += int(ok.sum())
                # keep the best rejected candidates seen so far, for the fallback
                if (~ok).any():
                    pool_z = z[~ok] if best_z is None else torch.cat([best_z, z[~ok]])
                    pool_p = p[~ok] if best_p is None else torch.cat([best_p, p[~ok]])
                    top = torch.argsort(pool_p, descending=True, stable=True)[:n]
                    best_z, best_p = pool_z[top], pool_p[top]
                if accepted_total >= n or drawn >= max_candidates:
                    break
        all_z = torch.cat(kept + ([best_z] if best_z is not None else []))
        all_p = torch.cat(kept_p + ([best_p] if best_p is not None else []))
        chosen, n_accepted = select_codes(all_p, n, threshold)
        return all_z[chosen], n_accepted, drawn

    # --- inference ------------------------------------------------------------------------------
    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        o = options  # checked and completed by Method.check_options
        samples = o["samples"]
        direction = o["direction"]
        p_accept = float(o["p_accept"])
        max_candidates = max(int(o["max_candidates"]), samples)
        generator = torch.Generator().manual_seed(int(o["seed"]))

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(x.device)

        self._check_grid(x)
        was_training = self.networks.training
        self.networks.eval()
        counterfactuals, means, stds, probabilities, accepted = [], [], [], [], []
        try:
            with torch.no_grad():
                for image in x:
                    image = image[None]
                    padded, shape = pad_to_multiple(image, self.multiple)
                    z_c, mu, _ = self.encode(padded)
                    p_abnormal = float(torch.softmax(self.classify(mu), dim=1)[0, 1])
                    if direction == "auto":
                        target = 0 if p_abnormal >= 0.5 else 1
                    else:
                        target = 0 if direction == "to_normal" else 1
                    codes, n_ok, _ = self.sample_codes(
                        samples, target, tuple(mu.shape[1:]), p_accept, max(64, 4 * samples), max_candidates, randn
                    )
                    generated = crop_to(self.networks["generator"](z_c.expand(samples, *z_c.shape[1:]), codes.to(z_c.dtype)), shape)
                    if o["map_reference"] == "reconstruction":
                        # a short-trained autoencoder's reconstruction error is as large as an atrophy; the
                        # difference between two decodings of the same content code does not carry it
                        reference = crop_to(self.networks["generator"](z_c, mu.to(z_c.dtype)), shape)
                        generated = image + (generated - reference)
                    maps = (generated - image).float()
                    counterfactuals.append(generated[:1].to(x.dtype))
                    means.append(maps.mean(0, keepdim=True))
                    stds.append(maps.std(0, unbiased=False, keepdim=True))
                    probabilities.append(p_abnormal)
                    accepted.append(n_ok)
        finally:
            self.networks.train(was_training)
        counterfactual = torch.cat(counterfactuals)
        if len(probabilities) == 1:
            scalars = {"class_probability": probabilities[0], "icam_accepted_samples": float(accepted[0]), "icam_samples": float(samples)}
        else:
            scalars = {f"class_probability_{i}": p for i, p in enumerate(probabilities)}
            scalars.update({f"icam_accepted_samples_{i}": float(a) for i, a in enumerate(accepted)})
            scalars["icam_samples"] = float(samples)
        return AttributionResult(
            attribution=counterfactual - x,
            counterfactual=counterfactual,
            extras={"icam_mean": torch.cat(means).to(x.dtype), "icam_std": torch.cat(stds).to(x.dtype)},
            extra_kinds={"icam_mean": "difference", "icam_std": "difference"},
            scalars=scalars,
        )

    def class_probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(abnormal | x) from the attribute classifier on mu(E_a(x)), shape (B,)."""
        was_training = self.networks.training
        self.networks.eval()
        try:
            with torch.no_grad():
                padded, _ = pad_to_multiple(x, self.multiple)
                mu, _ = self.networks["attribute_encoder"](padded)
                return torch.softmax(self.classify(mu), dim=1)[:, 1]
        finally:
            self.networks.train(was_training)

    def validation_map(self, x: torch.Tensor) -> torch.Tensor:
        # the single-swap map needs one sample; the mean/std maps are not used for model selection
        return self.attribute(x, samples=1).attribution

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self, total_steps: int):
        c, nets = self.config, self.networks
        betas = (float(c["beta1"]), float(c["beta2"]))
        schedule = linear_decay_schedule(total_steps, float(c["decay_start_fraction"]))
        main = [p for n in ("content_encoder", "attribute_encoder", "generator", "classifier") for p in nets[n].parameters()]
        discs = list(nets["d_swap"].parameters()) + list(nets["d_random"].parameters())
        wd = float(c["weight_decay"])
        return {
            "encoders_generator": (torch.optim.Adam(main, lr=float(c["lr"]), betas=betas, weight_decay=wd), schedule),
            "discriminators": (torch.optim.Adam(discs, lr=float(c["lr"]), betas=betas, weight_decay=wd), schedule),
            "content_discriminator": (
                torch.optim.Adam(nets["d_content"].parameters(), lr=float(c["content_dis_lr"]), betas=betas, weight_decay=wd),
                schedule,
            ),
        }

    # --- training: one step is four phases, each a function of the translations of the step's batch ---------
    def training_step(self, batch, ctx: TrainingContext):
        if ctx.step < int(self.config["class_warmup_steps"]):
            return self._warm_up_classifiers(batch, ctx)
        t = self._translate(batch, ctx)
        loss_dc = self._update_content_discriminator(t, ctx)
        discriminator_logs = self._update_domain_discriminators(t, ctx)
        generator_logs, attr_accuracy = self._update_encoders_generator(t, ctx)
        return {
            **generator_logs,
            **discriminator_logs,
            "loss_d_content": loss_dc.item(),
            "train_attr_accuracy": attr_accuracy.item(),
            "rejection_accepted_fraction": t.accepted / float(2 * t.n),
            "class_warmup": 0.0,
        }

    def _warm_up_classifiers(self, batch, ctx: TrainingContext) -> dict:
        """A class-warm-up step: the attribute encoder + latent classifier (class loss and KL, their weights in the
        full step) and the domain discriminators' class heads on the real images; nothing else is touched."""
        nets, c = self.networks, self.config
        x_raw, y_raw = batch["normal"], batch["abnormal"]
        n = min(x_raw.shape[0], y_raw.shape[0])
        reals = torch.cat([x_raw[:n], y_raw[:n]])
        self._check_grid(reals)
        labels = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]).to(reals.device)
        with ctx.autocast():
            mu, logvar = nets["attribute_encoder"](pad_to_multiple(reals, self.multiple)[0])
        mu, logvar = mu.float(), logvar.float()
        attr_logits = self.classify(mu)
        loss_attr_cls = F.cross_entropy(attr_logits, labels)
        loss_kl = gaussian_kl(mu, logvar, per=n)
        ctx.optimize("encoders_generator", c["lambda_attr_cls"] * loss_attr_cls + c["lambda_kl"] * loss_kl)
        with ctx.autocast():
            class_losses = {name: F.cross_entropy(nets[name](reals)[1].float(), labels) for name in ("d_swap", "d_random")}
        ctx.optimize("discriminators", c["lambda_dis_cls"] * sum(class_losses.values()))
        with torch.no_grad():
            attr_accuracy = (attr_logits.argmax(1) == labels).float().mean()
        return {
            "loss_attr_cls": loss_attr_cls.item(),
            "loss_kl": loss_kl.item(),
            "loss_d_swap_cls": class_losses["d_swap"].item(),
            "loss_d_random_cls": class_losses["d_random"].item(),
            "train_attr_accuracy": attr_accuracy.item(),
            "class_warmup": 1.0,
        }

    def _translate(self, batch, ctx: TrainingContext) -> "_Translations":
        """Encode both images of each (normal, abnormal) pair, then decode reconstructions, swaps and random-code
        translations (graph kept for the encoder/generator update)."""
        c = self.config
        x_raw, y_raw = batch["normal"], batch["abnormal"]
        n = min(x_raw.shape[0], y_raw.shape[0])  # swaps pair the i-th normal with the i-th abnormal image
        x_raw, y_raw = x_raw[:n], y_raw[:n]
        self._check_grid(x_raw)
        x, shape = pad_to_multiple(x_raw, self.multiple)
        y, _ = pad_to_multiple(y_raw, self.multiple)
        labels = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]).to(x.device)
        with ctx.autocast():
            z_c_x, mu_x, logvar_x = self.encode(x)
            z_c_y, mu_y, logvar_y = self.encode(y)
        mu_x, logvar_x, mu_y, logvar_y = (t.float() for t in (mu_x, logvar_x, mu_y, logvar_y))
        latent = tuple(mu_x.shape[1:])
        z_a_x = mu_x + torch.exp(0.5 * logvar_x) * ctx.randn(n, *latent)
        z_a_y = mu_y + torch.exp(0.5 * logvar_y) * ctx.randn(n, *latent)
        # random attribute codes of the opposite class (x -> abnormal, y -> normal), rejection-sampled
        n_cand = max(int(c["rejection_candidates"]), n)
        thr = float(c["rejection_threshold"])
        z_r1, acc1, _ = self.sample_codes(n, 1, latent, thr, n_cand, n_cand, ctx.randn)
        z_r0, acc0, _ = self.sample_codes(n, 0, latent, thr, n_cand, n_cand, ctx.randn)
        with ctx.autocast():
            G = self.networks["generator"]
            images = {
                "rec_x": G(z_c_x, z_a_x),
                "rec_y": G(z_c_y, z_a_y),
                "swap_x": G(z_c_x, z_a_y),  # x made abnormal
                "swap_y": G(z_c_y, z_a_x),  # y made normal
                "rand_x": G(z_c_x, z_r1),
                "rand_y": G(z_c_y, z_r0),
            }
        return _Translations(
            n=n, shape=shape, latent=latent, labels=labels, x=x_raw, y=y_raw, z_c=(z_c_x, z_c_y), mu=(mu_x, mu_y),
            logvar=(logvar_x, logvar_y), random_codes=(z_r1, z_r0), accepted=acc0 + acc1, multiple=self.multiple, **images,
        )

    def _update_content_discriminator(self, t: "_Translations", ctx: TrainingContext) -> torch.Tensor:
        """D_c learns the class of the content codes."""
        c = self.config
        with ctx.autocast():
            dc_logits = self.networks["d_content"](torch.cat(t.z_c).detach())
        loss_dc = F.binary_cross_entropy_with_logits(dc_logits.float().squeeze(1), t.labels.float())
        ctx.optimize("content_discriminator", c["lambda_content_adv"] * loss_dc, clip_grad_norm=float(c["content_dis_clip"]))
        return loss_dc

    def _update_domain_discriminators(self, t: "_Translations", ctx: TrainingContext) -> dict:
        """Both domain discriminators: real vs translated (swaps, random codes), and the class of real images."""
        nets, c = self.networks, self.config
        reals = torch.cat([t.x, t.y])
        fakes = {"d_swap": t.crop(torch.cat([t.swap_x, t.swap_y])).detach(), "d_random": t.crop(torch.cat([t.rand_x, t.rand_y])).detach()}
        losses_d = {}
        with ctx.autocast():
            loss_d = 0.0
            for name in ("d_swap", "d_random"):
                adv_real, cls_real = nets[name](reals)
                adv_fake, _ = nets[name](fakes[name])
                gan = _ADVERSARIAL.real(adv_real) + _ADVERSARIAL.fake(adv_fake)
                cls = F.cross_entropy(cls_real.float(), t.labels)
                losses_d[name] = (gan, cls)
                loss_d = loss_d + c["lambda_gan"] * gan + c["lambda_dis_cls"] * cls
        ctx.optimize("discriminators", loss_d)
        return {
            "loss_d": loss_d.item(),
            "loss_d_swap_gan": losses_d["d_swap"][0].item(),
            "loss_d_swap_cls": losses_d["d_swap"][1].item(),
            "loss_d_random_gan": losses_d["d_random"][0].item(),
            "loss_d_random_cls": losses_d["d_random"][1].item(),
        }

    def _update_encoders_generator(self, t: "_Translations", ctx: TrainingContext) -> tuple[dict, torch.Tensor]:
        """Encoders, generator and latent classifier against the frozen discriminators: the weighted sum of
        the terms below (weights: the ``lambda_*`` configuration keys); returns the logs and the latent
        classifier's accuracy on the batch."""
        nets, c, n, latent = self.networks, self.config, t.n, t.latent
        G = nets["generator"]
        frozen = ("d_swap", "d_random", "d_content")
        for name in frozen:
            nets[name].requires_grad_(False)
        fake_labels = 1 - t.labels  # swap_x / rand_x are abnormal, swap_y / rand_y normal
        with ctx.autocast():
            # adversarial and class losses of the translations
            loss_gan = 0.0
            loss_gen_cls = 0.0
            for name, fakes in (("d_swap", t.crop(torch.cat([t.swap_x, t.swap_y]))), ("d_random", t.crop(torch.cat([t.rand_x, t.rand_y])))):
                adv, cls = nets[name](fakes)
                loss_gan = loss_gan + _ADVERSARIAL.generator(adv)
                loss_gen_cls = loss_gen_cls + F.cross_entropy(cls.float(), fake_labels)
            # content: undecidable class (0.5/0.5), small codes
            content = torch.cat(t.z_c)
            loss_content_adv = bce_with_logits(nets["d_content"](content), 0.5)
            loss_content_l2 = content.float().pow(2).mean()
            # cross cycle: re-encode the swaps and swap back
            z_c_sx, mu_sx, logvar_sx = self.encode(t.repad(t.swap_x))
            z_c_sy, mu_sy, logvar_sy = self.encode(t.repad(t.swap_y))
            z_a_sx = mu_sx.float() + torch.exp(0.5 * logvar_sx.float()) * ctx.randn(n, *latent)
            z_a_sy = mu_sy.float() + torch.exp(0.5 * logvar_sy.float()) * ctx.randn(n, *latent)
            cc_x = G(z_c_sx, z_a_sy)  # x's content (carried by swap_x) with x's attribute (carried by swap_y)
            cc_y = G(z_c_sy, z_a_sx)
            # latent regression on the random-code translations
            mu_rx, _ = nets["attribute_encoder"](t.repad(t.rand_x))
            mu_ry, _ = nets["attribute_encoder"](t.repad(t.rand_y))
        # image losses: mean over the voxels of both images of each pair (the reference's scale)
        targets = (t.x, t.y)
        loss_rec_l1 = pair_l1((t.crop(t.rec_x), t.crop(t.rec_y)), targets)
        loss_rec_l2 = pair_l2((t.crop(t.rec_x), t.crop(t.rec_y)), targets)
        loss_cc_l1 = pair_l1((t.crop(cc_x), t.crop(cc_y)), targets)
        loss_cc_l2 = pair_l2((t.crop(cc_x), t.crop(cc_y)), targets)
        loss_fa = pair_l1((t.crop(t.swap_x), t.crop(t.swap_y)), targets)  # the feature-attribution maps M = translation - its content source
        z_r1, z_r0 = t.random_codes
        loss_latent = (mu_rx.float() - z_r1).abs().mean() + (mu_ry.float() - z_r0).abs().mean()
        # the classifier reads the attribute means of real images (the reference), random codes when sampling
        attr_logits = self.classify(torch.cat(t.mu))
        loss_attr_cls = F.cross_entropy(attr_logits, t.labels)
        loss_kl = gaussian_kl(torch.cat(t.mu), torch.cat(t.logvar), per=n)  # summed over the latent and the pair
        terms = {
            "rec_l1": loss_rec_l1,
            "rec_l2": loss_rec_l2,
            "cc_l1": loss_cc_l1,
            "cc_l2": loss_cc_l2,
            "gan": loss_gan,
            "gen_cls": loss_gen_cls,
            "attr_cls": loss_attr_cls,
            "content_adv": loss_content_adv,
            "kl": loss_kl,
            "content_l2": loss_content_l2,
            "latent": loss_latent,
            "fa": loss_fa,
        }
        loss_eg = sum(c[f"lambda_{name}"] * term for name, term in terms.items())
        ctx.optimize("encoders_generator", loss_eg)
        for name in frozen:
            nets[name].requires_grad_(True)
        with torch.no_grad():
            attr_accuracy = (attr_logits.argmax(1) == t.labels).float().mean()
        return {"loss_eg": loss_eg.item(), **{f"loss_{name}": term.item() for name, term in terms.items()}}, attr_accuracy


@dataclass
class _Translations:
    """One training step's batch (cropped to the model grid), its codes and its translations (padded grid)."""

    n: int
    shape: tuple
    latent: tuple
    labels: torch.Tensor
    x: torch.Tensor  # normal images
    y: torch.Tensor  # abnormal images
    z_c: tuple  # content codes (x, y)
    mu: tuple  # attribute means (x, y)
    logvar: tuple
    random_codes: tuple  # (abnormal codes for x, normal codes for y)
    accepted: int
    rec_x: torch.Tensor
    rec_y: torch.Tensor
    swap_x: torch.Tensor
    swap_y: torch.Tensor
    rand_x: torch.Tensor
    rand_y: torch.Tensor
    multiple: int = 1

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        return crop_to(image, self.shape)

    def repad(self, image: torch.Tensor) -> torch.Tensor:
        """A generated (padded-grid) image as the encoders see real ones: cropped, replicate-padded."""
        return pad_to_multiple(self.crop(image), self.multiple)[0]
