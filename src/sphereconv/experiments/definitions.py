"""The experiments of ``sphereconv reproduce``, as data.

Each experiment of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, arXiv:1711.03189),
Section 5, is a list of variants; a variant is a set of TrainConfig overrides applied on top of the
chosen scale (see :mod:`sphereconv.experiments.scales`). The runner trains every variant for every
seed; nothing here trains anything.

| experiment | paper | question |
|---|---|---|
| operators | Sec. 5.1, Table 2 | CNN vs linear / cosine / sigmoid (several k) / learnable SphereConv, 3 losses each |
| orthogonality | Sec. 5.1 | SphereNet with and without the orthogonality penalty on the filters |
| width | Sec. 5.1 | does the SphereNet gain more from more filters than the CNN? |
| depth | Sec. 5.2 | 9 to 69 plain layers, with and without BatchNorm: where CNNs stall, do SphereNets train? |
| spherenorm | Sec. 5.3 | BatchNorm vs SphereNorm vs both, mini-batch sizes 2 to 128 |
| learnable | Sec. 5.1 | fixed sigmoid SphereConv (several k) vs learnable k |
| resnet | Sec. 5.2 | wide SphereResNet-32 vs ResNet-32 on CIFAR-10+ |
| features2d | Sec. 5.4, Fig. 5 | 2-D penultimate features on digits: CNN spokes vs SphereNet clusters |
| convergence | Sec. 5.2, Fig. 4 | SphereNet-9 vs CNN-9: iterations to reach given accuracies |

The 3 losses of ``operators``: softmax, weight-normalised softmax and GA-Softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..losses import GA_SOFTMAX_MARGIN
from ..nn.angular import DEFAULT_SIGMOID_K
from . import paper
from .paper import PaperAccuracy

# Reference sigmoid steepness (wy1iu/SphereNet; the layers' default) and the neighbours the
# paper's ablation sweeps.
REFERENCE_SIGMOID_K = DEFAULT_SIGMOID_K
SIGMOID_K_SWEEP = (0.1, 0.3, 0.7)
# Orthogonality penalty coefficient of the reference recipe (1e-4 * ||W^T W - I||_F^2).
REFERENCE_ORTHOGONALITY = 1e-4
# Width experiment (NIPS 2017 Sec. 5.1 compares 16/32/48, 64/96/128 and 128/192/256 filters per
# stage): multipliers of the scale's width, about 1/8, 1/2 and 1 of it.
WIDTH_FACTORS = (0.125, 0.5, 1.0)
# Depth experiment: the plain SphereNet family (conv layers per network).
DEPTHS = (9, 18, 36, 69)
# SphereNorm experiment: mini-batch sizes from 2 to 128 (NIPS 2017 Sec. 5.3).
SPHERENORM_BATCH_SIZES = (2, 8, 32, 128)


@dataclass(frozen=True)
class Variant:
    """One trained configuration of an experiment.

    ``overrides`` are TrainConfig keys; ``width_factor`` multiplies the scale's ``width_mult``;
    ``sweep_value``/``group`` place the variant in the experiment's sweep plot (final accuracy
    against e.g. batch size, one line per group); ``paper`` is the published CIFAR-10 number.
    """

    name: str
    label: str
    overrides: dict
    paper: PaperAccuracy | None = None
    width_factor: float = 1.0
    sweep_value: float | None = None
    group: str | None = None


@dataclass(frozen=True)
class Experiment:
    """A paper experiment: its variants plus how each scale adapts it."""

    name: str
    title: str
    claim: str
    variants: tuple[Variant, ...]
    # Per-scale extra overrides and base configs (e.g. the ResNet recipe at paper scale).
    scale_overrides: dict[str, dict] = field(default_factory=dict)
    scale_config_files: dict[str, str] = field(default_factory=dict)
    sweep_label: str | None = None
    sweep_log: bool = False
    features2d: bool = False
    prefers_digits: bool = False
    notes: str = ""

    def variant_names(self) -> list[str]:
        """Names of the variants, in table order."""
        return [v.name for v in self.variants]


def _sphere(operator: str, **extra: Any) -> dict[str, Any]:
    """Overrides of a SphereNet with ``operator`` (sigmoid gets the reference k unless given)."""
    overrides: dict[str, Any] = {"operator": operator}
    if operator == "sigmoid":
        overrides["sigmoid_k"] = REFERENCE_SIGMOID_K
    overrides.update(extra)
    return overrides


CNN = {"operator": "none"}
# Every GA-Softmax row states its margin (SphereFace's m = 4, see sphereconv.losses); its head uses
# the row's own operator g, which the engine passes on from ``operator``.
GA_SOFTMAX: dict[str, Any] = {"loss": "ga_softmax", "loss_kwargs": {"margin": GA_SOFTMAX_MARGIN}}

_LOSS_LABELS = {
    "softmax": "softmax",
    "weight_normalized": "weight-normalised softmax",
    "ga_softmax": f"GA-Softmax m={GA_SOFTMAX_MARGIN}",
}
_LOSS_OVERRIDES: dict[str, dict[str, Any]] = {
    "softmax": {"loss": "softmax"},
    "weight_normalized": {"loss": "weight_normalized"},
    "ga_softmax": GA_SOFTMAX,
}


def _operators() -> Experiment:
    variants = [Variant("cnn", "CNN-9, softmax", dict(CNN, loss="softmax"), paper.CNN9_SOFTMAX)]
    paper_softmax = {
        "linear": paper.SPHERENET9_LINEAR,
        "cosine": paper.SPHERENET9_COSINE,
        "sigmoid": paper.SPHERENET9_SIGMOID,
    }
    for loss, suffix in (("softmax", ""), ("weight_normalized", "_wn"), ("ga_softmax", "_ga")):
        for op in ("linear", "cosine", "sigmoid"):
            value = paper_softmax[op] if loss == "softmax" else None
            if loss == "weight_normalized" and op == "cosine":
                value = paper.SPHERENET9_COSINE_WN
            op_label = f"sigmoid k={REFERENCE_SIGMOID_K}" if op == "sigmoid" else op
            variants.append(
                Variant(
                    f"{op}{suffix}",
                    f"SphereNet-9 {op_label}, {_LOSS_LABELS[loss]}",
                    _sphere(op, **_LOSS_OVERRIDES[loss]),
                    value,
                )
            )
    for k in SIGMOID_K_SWEEP:
        if k != REFERENCE_SIGMOID_K:
            variants.append(
                Variant(
                    f"sigmoid_k{k}",
                    f"SphereNet-9 sigmoid k={k}, softmax",
                    _sphere("sigmoid", sigmoid_k=k, loss="softmax"),
                )
            )
    variants.append(
        Variant(
            "learnable_sigmoid",
            "SphereNet-9 learnable sigmoid, softmax",
            _sphere("learnable_sigmoid", loss="softmax"),
            paper.SPHERENET9_LEARNABLE,
        )
    )
    return Experiment(
        name="operators",
        title="SphereConv operators x losses",
        claim=(
            "every SphereConv operator matches or beats the CNN; "
            "sigmoid k=0.3 is best with softmax (91.81 vs 90.86 on CIFAR-10)"
        ),
        variants=tuple(variants),
    )


def _orthogonality() -> Experiment:
    return Experiment(
        name="orthogonality",
        title="Orthogonality penalty on SphereConv filters",
        claim="the orthogonality constraint on the filters helps SphereNets slightly",
        variants=(
            Variant(
                "cosine_orth",
                "SphereNet-9 cosine, orthogonality 1e-4",
                _sphere("cosine", orthogonality=REFERENCE_ORTHOGONALITY),
            ),
            Variant("cosine_no_orth", "SphereNet-9 cosine, no orthogonality", _sphere("cosine", orthogonality=0.0)),
            Variant("cnn", "CNN-9 (penalty applies to SphereConv only)", dict(CNN)),
        ),
    )


def _width() -> Experiment:
    variants = []
    for factor in WIDTH_FACTORS:
        for kind, overrides in (("cnn", dict(CNN)), ("cosine", _sphere("cosine"))):
            label = "CNN-9" if kind == "cnn" else "SphereNet-9 cosine"
            variants.append(
                Variant(
                    f"{kind}_w{factor:g}",
                    f"{label}, width x{factor:g}",
                    overrides,
                    width_factor=factor,
                    sweep_value=factor,
                    group=label,
                )
            )
    return Experiment(
        name="width",
        title="Network width",
        claim="SphereNets gain more from more filters than CNNs; narrow SphereNets start slower",
        variants=tuple(variants),
        sweep_label="width (multiple of the scale's width)",
        sweep_log=True,
    )


# Plain networks without BatchNorm get a learning-rate warm-up (one-cycle, same peak lr), CNN and
# SphereNet alike: at 36+ layers the first full-size Adam steps at 1e-3 erase the SphereNet's
# dependence on its input and it stays at chance; a warm-up avoids that (diagnosis and plots in
# docs/RESULTS.md, depth section). The reference code trains only the 9-layer net with BatchNorm.
NO_BN_WARMUP = {"schedule": "onecycle"}


def _depth() -> Experiment:
    variants = []
    for depth in DEPTHS:
        for kind, overrides, label in (("cnn", dict(CNN), "CNN"), ("cosine", _sphere("cosine"), "SphereNet cosine")):
            for bn in (True, False):
                group = f"{label}{'' if bn else ' (no BN)'}"
                variants.append(
                    Variant(
                        f"{kind}{depth}_{'bn' if bn else 'nobn'}",
                        f"{label}-{depth}, {'BatchNorm' if bn else 'no BatchNorm'}",
                        dict(overrides, model=f"spherenet{depth}", batch_norm=bn, **({} if bn else NO_BN_WARMUP)),
                        sweep_value=depth,
                        group=group,
                    )
                )
    return Experiment(
        name="depth",
        title="Depth and ultra-deep plain networks",
        claim="deep plain CNNs (esp. without BatchNorm) stall while SphereNets of the same depth still train",
        variants=tuple(variants),
        sweep_label="conv layers",
        sweep_log=True,
    )


def _spherenorm() -> Experiment:
    norms = (
        ("bn", "BatchNorm", {"operator": "none", "batch_norm": True, "sphere_norm": False}),
        ("sn", "SphereNorm", {"operator": "cosine", "batch_norm": False, "sphere_norm": True}),
        ("sn_bn", "SphereNorm + BatchNorm", {"operator": "cosine", "batch_norm": True, "sphere_norm": True}),
    )
    variants = [
        Variant(
            f"{key}_b{batch}",
            f"{label}, batch {batch}",
            dict(overrides, batch_size=batch),
            sweep_value=batch,
            group=label,
        )
        for batch in SPHERENORM_BATCH_SIZES
        for key, label, overrides in norms
    ]
    return Experiment(
        name="spherenorm",
        title="SphereNorm vs BatchNorm across mini-batch sizes",
        claim=(
            "SphereNorm uses no batch statistics, so it degrades less than BatchNorm at small batches; "
            "SphereNorm+BN converges fastest"
        ),
        variants=tuple(variants),
        sweep_label="mini-batch size",
        sweep_log=True,
        notes="Every variant runs the same number of iterations, so small batches see fewer images.",
    )


def _learnable() -> Experiment:
    variants = [
        Variant(
            f"sigmoid_k{k}",
            f"SphereNet-9 sigmoid k={k} (fixed)",
            _sphere("sigmoid", sigmoid_k=k),
            paper.SPHERENET9_SIGMOID if k == REFERENCE_SIGMOID_K else None,
        )
        for k in SIGMOID_K_SWEEP
    ]
    variants.append(
        Variant(
            "learnable_sigmoid",
            "SphereNet-9 learnable sigmoid",
            _sphere("learnable_sigmoid"),
            paper.SPHERENET9_LEARNABLE,
        )
    )
    return Experiment(
        name="learnable",
        title="Learnable vs fixed SphereConv",
        claim="learning k per filter is about as good as the best hand-picked k",
        variants=tuple(variants),
    )


def _resnet() -> Experiment:
    return Experiment(
        name="resnet",
        title="SphereResNet-32 vs ResNet-32 (wide)",
        claim="the wide SphereResNet-32 beats ResNet-32 on CIFAR-10+ (94.68 vs 93.09)",
        variants=(
            Variant(
                "resnet32", "ResNet-32 (wide), conv", {"model": "sphere_resnet32", "operator": "none"}, paper.RESNET32
            ),
            Variant(
                "sphere_resnet32",
                "SphereResNet-32 (wide), linear",
                {"model": "sphere_resnet32", "operator": "linear"},
                paper.SPHERE_RESNET32,
            ),
        ),
        scale_overrides={"small": {"augment": "crop_flip"}},
        scale_config_files={"paper": "sphere_resnet32_cifar10plus.yaml"},
    )


def _features2d() -> Experiment:
    return Experiment(
        name="features2d",
        title="2-D penultimate features",
        claim=(
            "with a 2-D penultimate layer, CNN features spread along radial spokes "
            "while SphereNet features form compact, angularly separated clusters"
        ),
        variants=(
            Variant("cnn", "CNN-9, softmax", dict(CNN, feature_dim=2)),
            Variant("cosine", "SphereNet-9 cosine, softmax", _sphere("cosine", feature_dim=2)),
            Variant(
                "cosine_ga",
                f"SphereNet-9 cosine, {_LOSS_LABELS['ga_softmax']}",
                _sphere("cosine", feature_dim=2, **GA_SOFTMAX),
            ),
        ),
        scale_overrides={"paper": {"iterations": 10000, "augment": "none"}},
        features2d=True,
        prefers_digits=True,
    )


def _convergence() -> Experiment:
    return Experiment(
        name="convergence",
        title="Convergence: SphereNet-9 vs CNN-9",
        claim="SphereNets converge faster: 80% test accuracy after 3k-4.5k iterations vs 11.5k for the CNN on CIFAR-10",
        variants=(
            Variant("cnn9", "CNN-9, softmax", dict(CNN), paper.CNN9_SOFTMAX),
            Variant("spherenet9_cosine", "SphereNet-9 cosine, softmax", _sphere("cosine"), paper.SPHERENET9_COSINE),
        ),
        notes=paper.CONVERGENCE_NOTE,
    )


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        _operators(),
        _orthogonality(),
        _width(),
        _depth(),
        _spherenorm(),
        _learnable(),
        _resnet(),
        _features2d(),
        _convergence(),
    )
}


def list_experiments() -> list[str]:
    """Names accepted by ``sphereconv reproduce``."""
    return list(EXPERIMENTS)


def get_experiment(name: str) -> Experiment:
    """Return the experiment called ``name`` or raise :class:`ConfigError` listing the choices."""
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ConfigError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}") from None
