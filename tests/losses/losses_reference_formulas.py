"""Slow, obvious per-sample formulas the loss tests compare against (plain Python math, float64)."""

from __future__ import annotations

import math

import torch


def g_of_angle(theta: float, operator: str, k: float = 0.3) -> float:
    """The angular functions of Liu et al. 2017, Sec. 2.1, written from the paper's formulas."""
    if operator == "linear":
        return 1.0 - 2.0 * theta / math.pi
    if operator == "cosine":
        return math.cos(theta)
    if operator == "square_cosine":
        c = math.cos(theta)
        return math.copysign(c * c, c)
    if operator == "sigmoid":
        e = math.exp(theta / k - math.pi / (2.0 * k))
        c_k = (1.0 + math.exp(-math.pi / (2.0 * k))) / (1.0 - math.exp(-math.pi / (2.0 * k)))
        return c_k * (1.0 - e) / (1.0 + e)
    raise AssertionError(operator)


def psi_of_angle(theta: float, m: float, operator: str, k: float = 0.3) -> float:
    """Margin function: SphereFace's (-1)^n cos(m theta) - 2n for cosine, g(m theta - n pi) - 2n otherwise."""
    n = math.floor(m * theta / math.pi)
    if operator == "cosine":
        return (-1.0) ** n * math.cos(m * theta) - 2.0 * n
    return g_of_angle(m * theta - n * math.pi, operator, k) - 2.0 * n


def norm_e(v: list[float], eps: float) -> float:
    """sqrt(sum v^2 + eps m^2), m = max |v| (1 if v is all zero): the relative eps of sphereconv.nn."""
    m = max(abs(a) for a in v) or 1.0
    return math.sqrt(sum(a * a for a in v) + eps * m * m)


def cosines(x: list[float], weight: torch.Tensor, eps: float) -> list[float]:
    rows = weight.tolist()
    out = []
    for w in rows:
        c = sum(a * b for a, b in zip(x, w)) / (norm_e(x, eps) * norm_e(w, eps))
        out.append(min(1.0, max(-1.0, c)))
    return out


def cross_entropy_of(logits: list[float], y: int) -> float:
    top = max(logits)
    log_z = top + math.log(sum(math.exp(v - top) for v in logits))
    return log_z - logits[y]


def ga_softmax_loss(features, labels, weight, m, operator, k=0.3, lam=0.0, eps=1e-4) -> float:
    """Mean of -log(e^{|x| f_y} / (e^{|x| f_y} + sum_{j != y} e^{|x| g(theta_j)})),
    f_y = (lam g(theta_y) + psi(theta_y)) / (1 + lam)."""
    total = 0.0
    for x, y in zip(features.tolist(), labels.tolist()):
        x_norm = norm_e(x, eps)
        thetas = [math.acos(c) for c in cosines(x, weight, eps)]
        logits = [x_norm * g_of_angle(t, operator, k) for t in thetas]
        f_y = (lam * g_of_angle(thetas[y], operator, k) + psi_of_angle(thetas[y], m, operator, k)) / (1.0 + lam)
        logits[y] = x_norm * f_y
        total += cross_entropy_of(logits, y)
    return total / len(labels)


def cosface_loss(features, labels, weight, s, m, eps=1e-4) -> float:
    total = 0.0
    for x, y in zip(features.tolist(), labels.tolist()):
        cos = cosines(x, weight, eps)
        logits = [s * c for c in cos]
        logits[y] = s * (cos[y] - m)
        total += cross_entropy_of(logits, y)
    return total / len(labels)


def arcface_loss(features, labels, weight, s, m, eps=1e-4) -> float:
    total = 0.0
    for x, y in zip(features.tolist(), labels.tolist()):
        cos = cosines(x, weight, eps)
        logits = [s * c for c in cos]
        theta = math.acos(cos[y])
        target = math.cos(theta + m) if theta + m <= math.pi else cos[y] - m * math.sin(m)
        logits[y] = s * target
        total += cross_entropy_of(logits, y)
    return total / len(labels)
