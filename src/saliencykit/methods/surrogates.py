"""The weighted linear surrogates that LIME fits to its perturbation scores (`surrogate=`):
`weighted_ridge` (LIME's ridge regression) and `weighted_lasso` (scikit-learn's weighted
Lasso objective, Captum's default LIME surrogate), both in float64, each returning
`(coefficients, intercept)`."""
from __future__ import annotations

import numpy as np
import torch


def weighted_ridge(X: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, alpha: float):
    """argmin_{beta, c} sum_i w_i (y_i - c - X_i beta)^2 + alpha |beta|^2 (intercept not penalised),
    solved in float64 (weighted centring, then the normal equations)."""
    X, y, wt = X.double(), y.double(), weights.double()
    wsum = wt.sum()
    xm = (wt.unsqueeze(1) * X).sum(0) / wsum
    ym = (wt * y).sum() / wsum
    Xc, yc = X - xm, y - ym
    A = Xc.T @ (wt.unsqueeze(1) * Xc) + alpha * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    rhs = Xc.T @ (wt * yc)
    beta = torch.linalg.lstsq(A, rhs.unsqueeze(1)).solution.squeeze(1)
    return beta, ym - xm @ beta


def weighted_lasso(X: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, alpha: float, tol: float = 1e-10,
                   max_iter: int = 100_000):
    """argmin_{beta, c} 1/(2 sum w) sum_i w_i (y_i - c - X_i beta)^2 + alpha |beta|_1 (intercept not
    penalised): scikit-learn's `Lasso` objective with `sample_weight` (what Captum's `SkLearnLasso`
    fits), solved in float64 by cyclic coordinate descent on the weighted-centred data until no
    coefficient moves by more than `tol` (relative to the largest one) in a sweep."""
    X = X.detach().double().cpu().numpy()
    y = y.detach().double().cpu().numpy()
    v = weights.detach().double().cpu().numpy()
    v = v / v.sum()
    xm, ym = v @ X, float(v @ y)
    Xc, r = X - xm, y - ym                     # r: the residual of beta = 0
    z = v @ (Xc * Xc)
    beta = np.zeros(X.shape[1])
    for _ in range(int(max_iter)):
        biggest, moved = 0.0, 0.0
        for j in range(X.shape[1]):
            if z[j] <= 0:                      # a feature constant over the samples: no information
                continue
            rho = float(v @ (Xc[:, j] * r)) + z[j] * beta[j]
            new = np.sign(rho) * max(abs(rho) - alpha, 0.0) / z[j]
            if new != beta[j]:
                r -= Xc[:, j] * (new - beta[j])
                moved = max(moved, abs(new - beta[j]))
                beta[j] = new
            biggest = max(biggest, abs(new))
        if moved <= tol * max(biggest, 1e-300):
            break
    beta_t = torch.from_numpy(beta).to(weights.device)
    return beta_t, ym - float(xm @ beta)


SURROGATES = {"ridge": weighted_ridge, "lasso": weighted_lasso}
