"""Batched 3x3 (and 6x6) matrix functions for the cell filter, over stacks ``(B, n, n)``.

``scipy.linalg.expm`` / ``logm`` / ``expm_frechet`` work on one small matrix per call with a large fixed cost
(ASE's ``FrechetCellFilter`` makes eleven such calls per step); here every cell of a batch is handled by a few
``np.matmul`` calls on the stack. Accuracy is that of the scipy routines (~1e-16 relative): exponentials by
scaling and squaring of a degree-12 Taylor polynomial with the scaled 1-norm <= 1/4 (truncation error < 3e-18).
"""

from __future__ import annotations

import numpy as np

TAYLOR_DEGREE = 12
SCALED_NORM = 0.25


def expm(a: np.ndarray) -> np.ndarray:
    """Matrix exponential of every matrix of the stack ``a`` (``(..., n, n)``)."""
    a = np.asarray(a, dtype=float)
    return _expm(a, np.abs(a).sum(axis=-2).max(axis=-1))


def _expm(a: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Scaling and squaring with the scaling chosen from ``norm`` (one value per matrix)."""
    shape = a.shape
    a = a.reshape(-1, shape[-2], shape[-1])
    norm = np.asarray(norm, dtype=float).reshape(-1)
    with np.errstate(divide="ignore"):
        s = np.where(norm > SCALED_NORM, np.ceil(np.log2(norm / SCALED_NORM)), 0.0).astype(np.int64)
    scaled = a / np.ldexp(1.0, s)[:, None, None]
    eye = np.broadcast_to(np.eye(shape[-1]), scaled.shape)
    result = eye.copy()
    for k in range(TAYLOR_DEGREE, 0, -1):  # Horner: I + A/1 (I + A/2 (I + ...))
        result = eye + scaled @ result / k
    for i in range(int(s.max(initial=0))):
        sel = s > i
        if sel.all():
            result = result @ result
        else:
            result[sel] = result[sel] @ result[sel]
    return result.reshape(shape)


def expm_frechet_adjoint(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``D(X^T)[G]``: the Fréchet derivative of ``exp`` at ``X^T`` in direction ``G``, for stacks ``(B, 3, 3)``.

    It is the adjoint of ``E -> D(X)[E]`` under the Frobenius product, so element ``(m, n)`` equals
    ``sum(expm_frechet(X, E_mn) * G)`` (what ASE's ``FrechetCellFilter`` computes with nine scipy calls):
    the upper-right block of ``exp([[X^T, G], [0, X^T]])``. The k-th power of that block has
    ``sum_j X^j G X^(k-1-j)`` upper right, so the truncation error relative to ``|G|`` depends on ``|X|`` only:
    the scaling is chosen from ``|X|``, and ``G`` is normalised (the derivative is linear in it).
    """
    x = np.asarray(x, dtype=float)
    g = np.asarray(g, dtype=float)
    n = x.shape[-1]
    scale = np.abs(g).max(axis=(-2, -1))
    safe = np.where(scale > 0, scale, 1.0)
    block = np.zeros((*x.shape[:-2], 2 * n, 2 * n))
    xt = np.swapaxes(x, -1, -2)
    block[..., :n, :n] = xt
    block[..., n:, n:] = xt
    block[..., :n, n:] = g / safe[..., None, None]
    norm = np.abs(x).sum(axis=-2).max(axis=-1)
    return _expm(block, norm)[..., :n, n:] * scale[..., None, None]


def logm_near_identity(f: np.ndarray) -> np.ndarray:
    """Matrix logarithm of ``F`` close to the identity (the deformation gradient at the start of a run).

    Uses the series of ``log(I + D)`` when ``max|D| < 1e-4`` (error < 1e-17), else ``scipy.linalg.logm``.
    """
    f = np.asarray(f, dtype=float)
    out = np.empty_like(f)
    for i in range(f.shape[0]):
        d = f[i] - np.eye(f.shape[-1])
        if np.abs(d).max() < 1e-4:
            d2 = d @ d
            out[i] = d - d2 / 2 + d2 @ d / 3 - d2 @ d2 / 4
        else:
            from scipy.linalg import logm

            out[i] = np.real(logm(f[i]))
    return out


__all__ = ["expm", "expm_frechet_adjoint", "logm_near_identity"]
