"""medXGAN (medxgan.txt; Dravid et al., CVPR-W 2022): explain a frozen classifier through a two-code GAN.

Training (section 3.1, eq. 4). A classifier C trained beforehand by our classifier method
(``--method classifier``) is loaded from its model file (config ``classifier_model``) and frozen. The
generator G(z1, z2) takes an anatomy code z1 ~ N(0, I) and a pathology code z2: 0 for a negative (normal)
image, N(0, I) for a positive (abnormal) one. G and a discriminator D play the standard (BCE) GAN game on
the loop's normal + abnormal images, and G is also trained to make C see the intended class:
L_G = BCE(D(G(z)), real) + lambda_class * CE(C(G(z1, z2)), y) with lambda_class = 2 (reference code);
L_D = BCE(D(x), real) + BCE(D(G(z)), fake). Adam 2e-4, betas (0.5, 0.999), constant rate; DCGAN init
N(0, 0.02). The classifier's weights go into the medXGAN model file (inference network "classifier"), so
inference needs that one file; its architecture and grid are recorded in the configuration
(``classifier_config``, ``classifier_preprocessing``, ``grid_shape``).

Inference (section 3.1, eq. 5 and 7). The scan x is inverted: z1 starts at 0, z2 at a seeded N(0, I) draw;
Adam (lr 0.01) minimises, per image, 4 * MSE(G(z1, z2), x) + BCE(P_C(G(z1, z2)), P_C(x)) (P_C = C's
softmax probability of abnormal; the weight 4 is the reference code's). Then
* ``medxgan_reconstruction`` = G(z1, z2), ``medxgan_negative`` = G(z1, 0) (the negative realisation);
* ``medxgan_difference`` = G(z1, z2) - G(z1, 0): medXGAN's own difference map (positive where the
  abnormal realisation is brighter);
* ``medxgan_lig`` (latent integrated gradients, eq. 7) = [G(z1, z2) - G(z1, 0)] * the mean over
  a = 0, 1/(m-1), ..., 1 of dP_C(abnormal)/dx at G(z1, a z2) (m = ig_steps = 11); positive = the change
  towards the reconstruction raised the classifier's P(abnormal);
* series ``medxgan_interpolation``: G(z1, a z2) for a = 0..1 (interpolation_frames), with the classifier's
  P(abnormal) of every frame.

Attribution (our convention, counterfactual minus input): G(z1, 0) - G(z1, z2) = -medxgan_difference, not
G(z1, 0) - x. G only approximates the scan (the paper's Fig. 7 and 11), and G(z1, 0) - x would be
dominated by that reconstruction error everywhere; the difference of the two realisations is exactly what
the pathology code changes. The counterfactual is x + attribution: the scan with that change removed
(its detail kept), which is also what the pipeline writes. G(z1, 0) itself is the ``medxgan_negative`` extra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..method_options import OptionSpec
from ..networks import init_normal_weights
from ..networks.medxgan import FrozenNetwork, MedXGenerator, medxgan_discriminator
from .base import AttributionResult, Method, TrainingContext
from .classifier import ClassifierBaseline
from .losses import AdversarialLoss
from .shared_specs import adam_beta, learning_rate, weight_average

_ADVERSARIAL = AdversarialLoss("bce")  # the standard GAN game of the reference code


class MedXGAN(Method):
    name = "medxgan"
    title = "medXGAN"
    outputs = (
        "counterfactual",
        "attribution",
        "mask",
        "class_probability",
        "inversion_mse",
        "negative_probability",
        "medxgan_difference",
        "medxgan_lig",
        "medxgan_negative",
        "medxgan_reconstruction",
        "medxgan_interpolation",
    )
    inference_networks = ("generator", "classifier")
    options = (
        OptionSpec(
            "inversion_steps", "int", 500, "Inversion steps",
            "Adam steps that fit the generator's latent codes to the scan (paper: 500); fewer: faster, "
            "coarser reconstruction (its MSE is reported as inversion_mse).", minimum=1, maximum=100_000,
        ),
        OptionSpec(
            "inversion_lr", "float", 0.01, "Inversion learning rate", "Adam learning rate of the latent inversion.",
            minimum=1e-6, maximum=10.0, step=0.001, decimals=6, advanced=True,
        ),
        OptionSpec("ig_steps", "int", 11, "Integrated-gradient steps", "Steps of the latent integrated gradients (medxgan_lig).", minimum=2, maximum=1000),
        OptionSpec(
            "interpolation_frames", "int", 11, "Interpolation frames", "Frames of the latent interpolation series from the negative to the scan.",
            minimum=2, maximum=200,
        ),
        OptionSpec("seed", "int", 0, "Random seed", "Seed of the random draws (same seed, same result).", minimum=0, maximum=2**31 - 1, advanced=True),
    )
    default_config = {
        # the frozen classifier: path of a model file written by `--method classifier` (training only);
        # its architecture, preprocessing and grid are copied into the next three keys when training
        "classifier_model": None,
        "classifier_config": None,
        "classifier_preprocessing": None,
        "grid_shape": None,  # tensor spatial shape (z, y, x) / (y, x); taken from the classifier file
        "z1_dim": 1000,  # the paper's MRI setting (X-ray: 100 / 10)
        "z2_dim": 100,
        "ngf": 64,
        "ndf": 64,
        "n_up": 0,  # generator up-samplings; 0 = so that the start grid is ~4 voxels on its shortest side
        "lr": 2e-4,
        "beta1": 0.5,
        "lambda_class": 2.0,
        "inversion_mse_weight": 4.0,
        "validation_inversion_steps": 50,  # the loop's validation inverts every held-out image: keep it short
        "ema_decay": 0.0,
    }
    config_specs = (
        OptionSpec("classifier_model", "str", None, nullable=True,
                   tooltip="model file of the classifier to explain, trained with --method classifier on the same data and grid (required for training)"),
        OptionSpec("classifier_config", "any", None,
                   tooltip="the frozen classifier's configuration, copied from classifier_model when training (do not set)"),
        OptionSpec("classifier_preprocessing", "any", None,
                   tooltip="the frozen classifier's preprocessing, copied from classifier_model when training (do not set)"),
        OptionSpec("grid_shape", "list", None, nullable=True,
                   tooltip="model grid in tensor order (z, y, x) / (y, x), taken from the classifier file when training"),
        OptionSpec("z1_dim", "int", 1000, minimum=1, maximum=100_000, tooltip="size of the anatomy code z1 (paper, MRI: 1000)"),
        OptionSpec("z2_dim", "int", 100, minimum=1, maximum=100_000, tooltip="size of the pathology code z2, all zeros for normal images (paper, MRI: 100)"),
        OptionSpec("ngf", "int", 64, minimum=1, tooltip="generator width before its last up-sampling, doubled per earlier one (up to 8x)"),
        OptionSpec("ndf", "int", 64, minimum=1, tooltip="discriminator width of its first layer, doubled per layer"),
        OptionSpec("n_up", "int", 0, minimum=0, maximum=12,
                   tooltip="generator up-samplings (each doubles the grid); 0: as many as leave ~4 voxels on the start grid's shortest side"),
        learning_rate("lr", 2e-4, "the generator and the discriminator"),
        adam_beta("beta1", 0.5, 1),
        OptionSpec("lambda_class", "float", 2.0, minimum=0.0,
                   tooltip="weight of the frozen classifier's cross-entropy that makes generated images show the intended class"),
        OptionSpec("inversion_mse_weight", "float", 4.0, minimum=0.0,
                   tooltip="weight of the image MSE against the classifier-probability BCE when inverting a scan into codes"),
        OptionSpec("validation_inversion_steps", "int", 50, minimum=0, maximum=100_000,
                   tooltip="inversion steps per held-out image during the loop's validation (short: validation inverts every image)"),
        weight_average(),
    )
    training_defaults = {"batch_size": 16}  # 16 normal + 16 abnormal: the reference batch of 32
    map_description = (
        "counterfactual minus input = G(z1, 0) - G(z1, z2) after latent inversion of the input "
        "(= minus medXGAN's difference map): negative where the classifier-specific (abnormal) features are"
    )

    # --- networks -------------------------------------------------------------------------------
    def build_networks(self, training: bool):
        c, dims = self.config, self.spatial_dims
        classifier = None
        if training:
            if not c["classifier_model"]:
                raise ValueError(
                    "medxgan explains a trained classifier: pass --config classifier_model=PATH, the model file of a "
                    "classifier trained on the same data and grid with `--method classifier`."
                )
            metadata, classifier = ClassifierBaseline.load_classifier(c["classifier_model"], "cpu", return_metadata=True)
            if metadata.spatial_dims != dims:
                raise ValueError(
                    f"classifier_model {c['classifier_model']} is a {metadata.spatial_dims}D classifier; medxgan is being trained in {dims}D."
                )
            grid = [int(s) for s in reversed(metadata.preprocessing["size"])]
            if c["grid_shape"] is not None and list(c["grid_shape"]) != grid:
                raise ValueError(f"grid_shape {c['grid_shape']} differs from the classifier's grid {grid}.")
            c["classifier_config"] = dict(metadata.method_config)
            c["classifier_preprocessing"] = dict(metadata.preprocessing)
            c["classifier_model"] = str(c["classifier_model"])
            c["grid_shape"] = grid
        if c["classifier_config"] is None or c["grid_shape"] is None:
            raise ValueError("medxgan: classifier_config and grid_shape are missing from the configuration (the model file is incomplete).")
        if len(c["grid_shape"]) != dims:
            raise ValueError(f"medxgan: grid_shape {c['grid_shape']} does not have {dims} entries.")
        if classifier is None:
            classifier = ClassifierBaseline.build_classifier(dims, c["classifier_config"])
        generator = init_normal_weights(MedXGenerator(c["grid_shape"], c["z1_dim"], c["z2_dim"], c["ngf"], c["n_up"] or None))
        nets = {"generator": generator, "classifier": FrozenNetwork(classifier)}
        if training:
            nets["discriminator"] = init_normal_weights(medxgan_discriminator(dims, generator.n_up, c["ndf"]))
        return nets

    @property
    def generator(self) -> MedXGenerator:
        return self.networks["generator"]

    def classifier_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.networks["classifier"](x)

    def abnormal_logit(self, x: torch.Tensor) -> torch.Tensor:
        """log P(abnormal)/P(normal) under the frozen classifier, shape (B,)."""
        logits = self.classifier_logits(x).float()
        return logits[:, 1] - logits[:, 0]

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self, total_steps: int):
        c = self.config
        betas = (c["beta1"], 0.999)
        return {
            "generator": (torch.optim.Adam(self.networks["generator"].parameters(), lr=c["lr"], betas=betas), None),
            "discriminator": (torch.optim.Adam(self.networks["discriminator"].parameters(), lr=c["lr"], betas=betas), None),
        }

    def sample_latents(self, n_negative: int, n_positive: int, randn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z1, z2, intended class): z2 = 0 for the negatives, N(0, I) for the positives."""
        c = self.config
        z1 = randn(n_negative + n_positive, c["z1_dim"])
        z2 = torch.cat([torch.zeros(n_negative, c["z2_dim"], device=z1.device), randn(n_positive, c["z2_dim"])], 0)
        y = torch.cat([torch.zeros(n_negative, dtype=torch.long), torch.ones(n_positive, dtype=torch.long)]).to(z1.device)
        return z1, z2, y

    def training_step(self, batch, ctx: TrainingContext):
        x_n, x_a = batch["normal"], batch["abnormal"]
        if list(x_n.shape[2:]) != list(self.config["grid_shape"]):
            raise ValueError(
                f"medxgan: training images have grid {tuple(x_n.shape[2:])}, but the classifier was trained on "
                f"{tuple(self.config['grid_shape'])}. Train medxgan with the classifier's preprocessing (--size, --spacing)."
            )
        nets, c = self.networks, self.config
        real = torch.cat([x_n, x_a], 0)
        z1, z2, y = self.sample_latents(len(x_n), len(x_a), ctx.randn)

        # Discriminator: real (normal and abnormal) vs generated.
        with ctx.autocast():
            fake = nets["generator"](z1, z2)
            d_real = nets["discriminator"](real).float()
            d_fake = nets["discriminator"](fake.detach()).float()
            loss_d = _ADVERSARIAL.real(d_real) + _ADVERSARIAL.fake(d_fake)
        ctx.optimize("discriminator", loss_d)

        # Generator: fool D, and make the frozen classifier see the class the pathology code asks for (eq. 4).
        nets["discriminator"].requires_grad_(False)
        with ctx.autocast():
            d_gen = nets["discriminator"](fake).float()
            loss_adv = _ADVERSARIAL.generator(d_gen)
            class_logits = self.classifier_logits(fake).float()
            loss_class = F.cross_entropy(class_logits, y)
            loss_g = loss_adv + c["lambda_class"] * loss_class
        ctx.optimize("generator", loss_g)
        nets["discriminator"].requires_grad_(True)
        return {
            "loss_g": loss_g.item(),
            "loss_adv": loss_adv.item(),
            "loss_class": loss_class.item(),
            "loss_d": loss_d.item(),
            "d_real": torch.sigmoid(d_real).mean().item(),
            "d_fake": torch.sigmoid(d_fake).mean().item(),
            "fake_class_accuracy": (class_logits.argmax(1) == y).float().mean().item(),
        }

    # --- inference ------------------------------------------------------------------------------
    def invert(self, x: torch.Tensor, steps: int = 500, lr: float = 0.01, seed: int = 0, z1_start: str = "zeros"):
        """Latent codes of `x` (eq. 5): returns (z1, z2, per-image reconstruction MSE after `steps`).

        Every image is optimised independently (per-image losses are summed, and Adam is per coordinate),
        so the result for an image does not depend on the rest of the batch. z1 starts at 0 (reference
        code) or, with ``z1_start="normal"``, at a seeded N(0, I) draw like z2 (the paper's convergence
        experiment, section 5, which restarts both codes from random draws).
        """
        if z1_start not in ("zeros", "normal"):
            raise ValueError(f"medxgan: z1_start must be 'zeros' or 'normal', got {z1_start!r}")
        c = self.config
        G = self.generator
        b = len(x)
        gen = torch.Generator().manual_seed(int(seed))
        # one draw per image, so that an image's start (and result) does not depend on the batch size
        z2 = torch.cat([torch.randn(1, c["z2_dim"], generator=gen) for _ in range(b)]).to(x.device).requires_grad_(True)
        if z1_start == "normal":
            z1 = torch.cat([torch.randn(1, c["z1_dim"], generator=gen) for _ in range(b)]).to(x.device).requires_grad_(True)
        else:
            z1 = torch.zeros(b, c["z1_dim"], device=x.device, requires_grad=True)
        x = x.detach().float()
        with torch.no_grad():
            target = torch.sigmoid(self.abnormal_logit(x))
        optimizer = torch.optim.Adam([z1, z2], lr=lr)
        weight = float(c["inversion_mse_weight"])
        with torch.enable_grad():
            for _ in range(int(steps)):
                image = G(z1, z2).float()
                mse = ((image - x) ** 2).flatten(1).mean(1)
                bce = F.binary_cross_entropy_with_logits(self.abnormal_logit(image), target, reduction="none")
                loss = (weight * mse + bce).sum()
                # gradients for the codes only: the networks' parameters are left untouched
                z1.grad, z2.grad = torch.autograd.grad(loss, [z1, z2])
                optimizer.step()
        with torch.no_grad():
            mse = ((G(z1, z2).float() - x) ** 2).flatten(1).mean(1)
        return z1.detach(), z2.detach(), mse

    def latent_integrated_gradients(self, z1: torch.Tensor, z2: torch.Tensor, steps: int = 11) -> torch.Tensor:
        """Eq. 7: [G(z1, z2) - G(z1, 0)] * mean_a dP_C(abnormal | G(z1, a z2)) / dx, a = 0..1 in `steps` steps."""
        G = self.generator
        alphas = torch.linspace(0.0, 1.0, max(2, int(steps)))
        total = None
        with torch.enable_grad():
            for a in alphas:
                with torch.no_grad():
                    image = G(z1, a.item() * z2).float()
                image.requires_grad_(True)
                p = torch.softmax(self.classifier_logits(image).float(), dim=1)[:, 1]
                (grad,) = torch.autograd.grad(p.sum(), image)
                total = grad if total is None else total + grad
        with torch.no_grad():
            difference = G(z1, z2).float() - G(z1, torch.zeros_like(z2)).float()
        return difference * total / len(alphas)

    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        o = options  # checked and completed by Method.check_options
        G = self.generator
        was_training = G.training
        G.eval()
        try:
            z1, z2, mse = self.invert(x, int(o["inversion_steps"]), float(o["inversion_lr"]), int(o["seed"]))
            lig = self.latent_integrated_gradients(z1, z2, int(o["ig_steps"]))
            with torch.no_grad():
                reconstruction = G(z1, z2).float()
                negative = G(z1, torch.zeros_like(z2)).float()
                difference = reconstruction - negative
                p_input = torch.sigmoid(self.abnormal_logit(x.float()))
                p_negative = torch.sigmoid(self.abnormal_logit(negative))
                alphas = torch.linspace(0.0, 1.0, max(2, int(o["interpolation_frames"])))
                frames = torch.stack([G(z1, a.item() * z2).float() for a in alphas], 0)
                frame_p = torch.stack([torch.sigmoid(self.abnormal_logit(f)) for f in frames], 0)  # (T, B)
        finally:
            G.train(was_training)
        attribution = (negative - reconstruction).to(x.dtype)
        if len(x) == 1:
            scalars = {
                "class_probability": float(p_input[0]),
                "negative_probability": float(p_negative[0]),
                "inversion_mse": float(mse[0]),
            }
            frame_values = [float(v) for v in frame_p[:, 0]]
        else:
            scalars = {}
            for i in range(len(x)):
                scalars.update({f"class_probability_{i}": float(p_input[i]), f"negative_probability_{i}": float(p_negative[i]), f"inversion_mse_{i}": float(mse[i])})
            frame_values = [[float(v) for v in row] for row in frame_p]
        return AttributionResult(
            attribution=attribution,
            counterfactual=x + attribution,
            extras={
                "medxgan_difference": difference.to(x.dtype),
                "medxgan_lig": lig.to(x.dtype),
                "medxgan_negative": negative.to(x.dtype),
                "medxgan_reconstruction": reconstruction.to(x.dtype),
            },
            extra_kinds={
                "medxgan_difference": "difference",
                "medxgan_lig": "difference",
                "medxgan_negative": "intensity",
                "medxgan_reconstruction": "intensity",
            },
            scalars=scalars,
            series={"medxgan_interpolation": frames.to(x.dtype)},
            series_values={"medxgan_interpolation": frame_values},
        )

    def validation_map(self, x: torch.Tensor) -> torch.Tensor:
        """The attribution with a short inversion (``validation_inversion_steps``), for model selection."""
        G = self.generator
        was_training = G.training
        G.eval()
        try:
            z1, z2, _ = self.invert(x, int(self.config["validation_inversion_steps"]))
            with torch.no_grad():
                return (G(z1, torch.zeros_like(z2)) - G(z1, z2)).to(x.dtype)
        finally:
            G.train(was_training)


__all__ = ["MedXGAN"]
