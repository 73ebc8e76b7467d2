"""Every loss row of the experiments trains the loss its name says (Liu et al., NIPS 2017, Sec. 2.2).

The classifier head of a weight-normalised or GA-Softmax row uses the row's own operator g (and
sigmoid k); a GA-Softmax row states its margin, trains with it, and its loss differs from the
weight-normalised softmax on the same weights; the annealing follows the run's length.
"""

from __future__ import annotations

import pytest
import torch

from sphereconv.data import load_dataset
from sphereconv.data.loader import normalize_pixels
from sphereconv.engine import Callback, load_config, train
from sphereconv.engine.objective import build_loss_module, build_model, head_operator
from sphereconv.experiments import get_experiment
from sphereconv.experiments.runner import plan_experiment
from sphereconv.losses import GA_SOFTMAX_MARGIN, GASoftmaxLoss, WeightNormalizedSoftmaxLoss, build_loss
from sphereconv.losses.margin import SPHEREFACE_ITERATIONS, annealing_lambda

RUN_ITERATIONS = 500


@pytest.fixture(scope="module")
def fashion_batch():
    images, labels = load_dataset("fashion-mnist", "test")
    return normalize_pixels(images[:64]), labels[:64]


def _model_and_loss(config):
    torch.manual_seed(0)
    model = build_model(config, 10, 1, 28)
    return model, build_loss_module(config, model, 10, RUN_ITERATIONS)


def _runs_by_variant(experiment: str) -> dict:
    plan = plan_experiment(experiment, "smoke", device="cpu", dataset="fashion-mnist", progress=False)
    return {run.variant.name: run for run in plan.runs}


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
def test_operators_ga_rows_use_their_operator_and_stated_margin(operator, fashion_batch):
    runs = _runs_by_variant("operators")
    ga_run, wn_run = runs[f"{operator}_ga"], runs[f"{operator}_wn"]
    margin = ga_run.variant.overrides["loss_kwargs"]["margin"]
    assert margin == GA_SOFTMAX_MARGIN >= 2 and f"m={margin:g}" in ga_run.variant.label
    model, ga = _model_and_loss(ga_run.config)
    _, wn = _model_and_loss(wn_run.config)
    assert isinstance(ga, GASoftmaxLoss) and type(wn) is WeightNormalizedSoftmaxLoss
    conv_operators = {m.operator for m in model.modules() if hasattr(m, "operator") and m is not model}
    assert conv_operators == {operator}
    assert ga.operator == wn.operator == operator and ga.margin == margin
    assert ga.sigmoid_k == wn.sigmoid_k == ga_run.config.sigmoid_k
    # Same weights, same real features: the margin makes the GA-Softmax loss larger. At the end of
    # the run lambda sits at its floor (5), where the margin carries 1/6 of the target logit.
    wn.weight.data.copy_(ga.weight.data)
    ga.iteration.fill_(RUN_ITERATIONS)
    with torch.no_grad():
        features = model.eval().forward_features(fashion_batch[0])
        ga_value, wn_value = ga(features, fashion_batch[1]), wn(features, fashion_batch[1])
    assert float(ga_value) > float(wn_value) + 0.01, (float(ga_value), float(wn_value))


def test_features2d_ga_row_states_and_trains_its_margin():
    run = _runs_by_variant("features2d")["cosine_ga"]
    _, loss = _model_and_loss(run.config)
    assert loss.margin == run.variant.overrides["loss_kwargs"]["margin"] == GA_SOFTMAX_MARGIN
    assert f"m={GA_SOFTMAX_MARGIN}" in run.variant.label and loss.operator == "cosine"


def test_every_margin_row_of_every_experiment_states_its_margin():
    for name in (
        "operators",
        "orthogonality",
        "width",
        "depth",
        "spherenorm",
        "learnable",
        "resnet",
        "features2d",
        "convergence",
    ):
        for variant in get_experiment(name).variants:
            if variant.overrides.get("loss") in ("ga_softmax", "a_softmax", "cosface", "arcface"):
                assert "margin" in variant.overrides.get("loss_kwargs", {}), (name, variant.name)


def test_ga_softmax_default_margin_without_annealing_differs_from_w_softmax(fashion_batch):
    config = load_config(None, {"operator": "cosine", "width_mult": 0.0625})
    torch.manual_seed(1)
    model = build_model(config, 10, 1, 28).eval()
    with torch.no_grad():
        features = model.forward_features(fashion_batch[0])
    ga = GASoftmaxLoss(model.num_features, 10, anneal=False)
    wn = WeightNormalizedSoftmaxLoss(model.num_features, 10)
    wn.load_state_dict(ga.state_dict(), strict=False)
    assert ga.margin == GA_SOFTMAX_MARGIN > 1
    with torch.no_grad():
        assert float(ga(features, fashion_batch[1])) > float(wn(features, fashion_batch[1])) + 0.1


def test_head_inherits_the_model_operator_unless_loss_kwargs_override():
    for operator, expected in (("none", "cosine"), ("linear", "linear"), ("learnable_sigmoid", "sigmoid")):
        config = load_config(None, {"operator": operator, "loss": "ga_softmax", "sigmoid_k": 0.5, "width_mult": 0.0625})
        assert head_operator(config) == expected
        _, loss = _model_and_loss(config)
        assert loss.operator == expected and loss.sigmoid_k == 0.5
    config = load_config(
        None,
        {
            "operator": "linear",
            "loss": "weight_normalized",
            "loss_kwargs": {"operator": "square_cosine"},
            "width_mult": 0.0625,
        },
    )
    assert _model_and_loss(config)[1].operator == "square_cosine"


def test_annealing_is_stretched_to_the_run_length():
    sphereface = GASoftmaxLoss(4, 3, anneal_iterations=SPHEREFACE_ITERATIONS)  # SphereFace's own schedule
    short = GASoftmaxLoss(4, 3, anneal_iterations=RUN_ITERATIONS)
    for t in (0, 1, 10, 100, 1000, 5000):
        sphereface.iteration.fill_(t)
        assert sphereface.current_lambda == pytest.approx(annealing_lambda(t))
        # t iterations of a 500-iteration run = t * 56 of SphereFace's 28k.
        short.iteration.fill_(t)
        assert short.current_lambda == pytest.approx(annealing_lambda(t * 28000 / RUN_ITERATIONS))
    short.iteration.fill_(RUN_ITERATIONS // 10)
    assert short.current_lambda == 5.0  # the floor within the first tenth of the run
    sphereface.iteration.fill_(RUN_ITERATIONS)
    assert sphereface.current_lambda > 15  # unscaled, lambda would still be ~16 after 500 steps


class _LossProbe(Callback):
    def on_train_start(self, trainer):
        self.anneal_iterations = int(trainer.loss_module.anneal_iterations)
        self.total_steps = trainer.total_steps


def test_trainer_anneals_over_its_run_and_logs_lambda(tmp_path):
    import json

    overrides = dict(
        model="spherenet9",
        width_mult=0.0625,
        dataset="fashion-mnist",
        train_subset=256,
        test_subset=100,
        batch_size=32,
        iterations=8,
        eval_every=4,
        checkpoint_every=0,
        eval_batch_size=100,
        progress=False,
        out=str(tmp_path / "run"),
        device="cpu",
        loss="ga_softmax",
    )
    probe = _LossProbe()
    train(load_config(None, overrides), [probe])
    assert probe.anneal_iterations == probe.total_steps == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lambdas = [r["margin_lambda"] for r in records]
    assert lambdas[0] == pytest.approx(annealing_lambda(4 * 28000 / 8)) and lambdas[-1] == 5.0
    assert build_loss("ga_softmax", 4, 3).margin == GA_SOFTMAX_MARGIN
