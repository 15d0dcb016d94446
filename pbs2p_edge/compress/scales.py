"""Closed-form scale fits for fixed signs, shared by every binarizer of `compress/blockq.py`.

A block's reconstruction is Q[r, j] = c[j] * keep[r, j] * (alpha[r] b[r, j] + mu[r] + [j salient] alpha2[r] s2[r, j])
with b, s2 in {-1, +1}. For fixed signs Q is linear in the row parameters (alpha, mu, alpha2) and, separately,
in the column scales c, so each set has a closed-form least-squares solution under any quadratic error
||(W - Q) A||^2 (A = I: plain Frobenius error; A = U_bb^-1: the GPTQ error of the block, see blockq.py).
"""

from __future__ import annotations

import torch

_RIDGE = 1e-12


def whitener(u_block: torch.Tensor) -> torch.Tensor:
    """A = U_bb^-1 (fp64): for any block quantization Q, the GPTQ loss of the block (its error after the
    optimal compensation of every later column) is ||(W_b - Q) A||_F^2, i.e. the metric A A^T = ((H^-1)_bb)^-1."""
    eye = torch.eye(u_block.shape[0], dtype=torch.float64)
    return torch.linalg.solve_triangular(u_block.double(), eye, upper=True)


def pm(signs: torch.Tensor) -> torch.Tensor:
    """bool -> {-1.0, +1.0} (fp64)."""
    return torch.where(signs, 1.0, -1.0).double()


def row_features(
    signs: torch.Tensor,
    keep: torch.Tensor,
    col: torch.Tensor | None,
    salient: list[int],
    s2: torch.Tensor | None,
    with_mu: bool = True,
) -> torch.Tensor:
    """Features [rows, p, cols] whose per-row combination theta gives Q: p = (alpha[, mu][, alpha2])."""
    mask = keep.double()
    scale = mask if col is None else mask * col.double()[None, :]
    feats = [scale * pm(signs)]
    if with_mu:
        feats.append(scale)
    if salient:
        f2 = torch.zeros_like(scale)
        f2[:, salient] = scale[:, salient] * pm(s2)
        feats.append(f2)
    return torch.stack(feats, dim=1)


def solve_rows(w: torch.Tensor, feats: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
    """theta [rows, p] minimizing ||(w_r - theta_r . feats_r) A||^2 for every row (A = I when None).

    Normal equations in fp64 with a tiny relative ridge, so rank-deficient rows (all kept signs equal, no kept
    salient entry) get a finite solution with the same reconstruction as the least-squares minimum."""
    w = w.double()
    if a is not None:
        w = w @ a
        feats = feats @ a
    gram = feats @ feats.transpose(1, 2)
    rhs = (feats @ w[:, :, None])[..., 0]
    p = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    gram = gram + (_RIDGE * scale)[:, None, None] * torch.eye(p, dtype=gram.dtype)
    return torch.linalg.solve(gram, rhs)


def row_values(
    theta: torch.Tensor,
    signs: torch.Tensor,
    keep: torch.Tensor,
    salient: list[int],
    s2: torch.Tensor | None,
    with_mu: bool,
) -> torch.Tensor:
    """V [rows, cols] = keep * (alpha b + mu + [salient] alpha2 s2): Q = V * c."""
    v = theta[:, :1] * pm(signs)
    k = 1
    if with_mu:
        v = v + theta[:, 1:2]
        k = 2
    if salient:
        v[:, salient] += theta[:, k : k + 1] * pm(s2)
    return v * keep.double()


def solve_cols(w: torch.Tensor, v: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
    """c [cols] minimizing ||(W - V diag(c)) A||^2 for fixed V (each column of V scaled by c_j).

    A = I: c_j = sum_r v w / sum_r v^2 per column. Otherwise (Hs o V^T V) c = sum_r v o (Hs w_r), Hs = A A^T.
    Columns that V never uses (fully pruned) get c_j = 1; any value gives the same reconstruction."""
    w, v = w.double(), v.double()
    used = v.square().sum(0) > 0
    if a is None:
        c = (v * w).sum(0) / v.square().sum(0).clamp_min(1e-300)
        return torch.where(used, c, torch.ones_like(c))
    hs = a @ a.T
    system = hs * (v.T @ v)
    rhs = ((w @ hs) * v).sum(0)
    idx = used.nonzero()[:, 0]
    c = torch.ones(w.shape[1], dtype=torch.float64)
    if idx.numel():
        sub = system[idx][:, idx]
        ridge = _RIDGE * torch.diagonal(sub).mean().clamp_min(1e-30)
        c[idx] = torch.linalg.solve(sub + ridge * torch.eye(idx.numel(), dtype=sub.dtype), rhs[idx])
    return c
