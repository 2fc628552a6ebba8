"""Analytic references for linear-Gaussian models (NumPy, float64), written
independently of the package so tests compare against exact answers.

Model, per plate element: ``z ~ N(m0, s0^2)``, ``x_j | z ~ N(a_j z + b_j, sig_j^2)``.
"""

from __future__ import annotations

import math

import numpy as np


def posterior(x, a, b, sig, m0=0.0, s0=1.0):
    """Mean and standard deviation of ``z | x`` (last axis of ``x`` is j)."""
    x, a, b, sig = (np.asarray(v, np.float64) for v in (x, a, b, sig))
    precision = 1.0 / s0**2 + np.sum(a**2 / sig**2, axis=-1)
    var = 1.0 / precision
    mean = var * (m0 / s0**2 + np.sum(a * (x - b) / sig**2, axis=-1))
    return mean, np.sqrt(var)


def log_evidence(x, a, b, sig, m0=0.0, s0=1.0):
    """``log p(x)`` of the model above; ``x`` may have leading batch axes."""
    x, a, b, sig = (np.asarray(v, np.float64) for v in (x, a, b, sig))
    mean = a * m0 + b
    cov = s0**2 * np.outer(a, a) + np.diag(sig**2)
    diff = x - mean
    sol = np.linalg.solve(cov, diff[..., None])[..., 0]
    _, logdet = np.linalg.slogdet(cov)
    d = x.shape[-1]
    return -0.5 * (np.sum(diff * sol, axis=-1) + logdet + d * math.log(2 * math.pi))


def normal_logpdf(x, loc, scale):
    x, loc, scale = (np.asarray(v, np.float64) for v in (x, loc, scale))
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * math.log(2 * math.pi)


def mc_iwae_bound(rng, x, a, b, sig, q_loc, q_scale, num_particles, reps):
    """Independent Monte Carlo of the per-element K-particle bound with a Normal
    guide: returns (mean over reps, standard error), each of shape ``x.shape[:-1]``."""
    x = np.asarray(x, np.float64)
    shape = (reps, num_particles) + x.shape[:-1]
    z = q_loc + q_scale * rng.standard_normal(shape)
    log_p = normal_logpdf(z, 0.0, 1.0) + np.sum(
        normal_logpdf(x, a * z[..., None] + b, sig), axis=-1
    )
    log_w = log_p - normal_logpdf(z, q_loc, q_scale)
    peak = log_w.max(axis=1, keepdims=True)
    bound = np.log(np.mean(np.exp(log_w - peak), axis=1)) + peak[:, 0]
    return bound.mean(axis=0), bound.std(axis=0, ddof=1) / math.sqrt(reps)


def assert_within(estimate, stderr, truth, z=5.0, what=""):
    """Assert ``|estimate - truth| <= z * stderr`` elementwise, with a message."""
    estimate, stderr, truth = (np.asarray(v, np.float64) for v in (estimate, stderr, truth))
    gap = np.abs(estimate - truth)
    ok = gap <= z * stderr
    assert np.all(ok), (
        f"{what}: estimate {estimate} vs {truth}: |gap| {gap} exceeds {z} standard errors {stderr}"
    )
