"""Pure math of pairwise preferences: ties (Davidson; Rao-Kupper) and the Laplace approximation of a
Bradley-Terry fit's uncertainty, on plain tensors. The preference model (`ddpo.preference.model`), active pair
selection (`ddpo.preference.active`) and the labellers' agreement (`ddpo.preference.agreement`) use them.

Notation: d = s_a - s_b is the difference of two items' strengths (log-odds under Bradley-Terry, 1952: P(a beats
b) = sigmoid(d)).
"""

from __future__ import annotations

import math

import torch

OUTCOMES = ("1", "2", "tie")
"""The order of the three outcomes in the probability tensors below: a preferred, b preferred, a tie."""


def davidson_log_probabilities(d: torch.Tensor, log_nu: torch.Tensor | float) -> torch.Tensor:
    """Davidson (1970), "On extending the Bradley-Terry model to accommodate ties", eq. (2.1): with strengths
    pi = exp(s),

        P(a) = pi_a / (pi_a + pi_b + nu sqrt(pi_a pi_b)),  P(tie) = nu sqrt(pi_a pi_b) / (same),

    which, divided through by sqrt(pi_a pi_b), is a softmax over the logits (d/2, -d/2, log nu). nu = 0 gives
    Bradley-Terry back; at d = 0 a tie has probability nu / (2 + nu). d: (n,) -> (n, 3) log-probabilities in
    `OUTCOMES` order."""
    log_nu = torch.as_tensor(log_nu, dtype=d.dtype).expand_as(d)
    return torch.log_softmax(torch.stack([d / 2, -d / 2, log_nu], dim=-1), dim=-1)


def rao_kupper_probabilities(d: torch.Tensor, log_theta: float) -> torch.Tensor:
    """Rao and Kupper (1967), "Ties in paired-comparison experiments": with theta = exp(log_theta) >= 1,
    P(a) = pi_a / (pi_a + theta pi_b) = sigmoid(d - log theta), P(b) = sigmoid(-d - log theta), P(tie) the rest.
    d: (n,) -> (n, 3) probabilities in `OUTCOMES` order."""
    if log_theta < 0:
        raise ValueError(f"Rao-Kupper needs theta >= 1 (log_theta >= 0); got log_theta={log_theta}")
    first, second = torch.sigmoid(d - log_theta), torch.sigmoid(-d - log_theta)
    return torch.stack([first, second, 1 - first - second], dim=-1)


def outcome_index(choices: list[str]) -> torch.Tensor:
    """Labels "1" / "2" / "tie" as indices into `OUTCOMES`: (n,) int64."""
    return torch.tensor([OUTCOMES.index(c) for c in choices], dtype=torch.long)


def davidson_nll(d: torch.Tensor, outcomes: torch.Tensor, log_nu: torch.Tensor | float) -> torch.Tensor:
    """Mean negative log-likelihood of outcomes (indices into `OUTCOMES`) under Davidson's model."""
    return -davidson_log_probabilities(d, log_nu).gather(-1, outcomes[:, None]).mean()


def laplace_covariance(jacobian: torch.Tensor, curvature: torch.Tensor, prior_precision: float) -> torch.Tensor:
    """The Laplace approximation's posterior covariance of a model's parameters theta around a fit, with the
    generalised Gauss-Newton Hessian (MacKay 1992; Daxberger et al. 2021, "Laplace Redux", Sec. 2):

        Sigma = (J^T diag(c) J + prior_precision I)^-1,

    J: (n, p) the Jacobian of each training pair's margin d_i with respect to theta, c: (n,) the curvature of
    each pair's loss in d (p (1 - p) for Bradley-Terry), prior_precision: that of the Gaussian prior an L2
    penalty is (2 n l2 for a mean loss plus l2 ||theta||^2). Returns (p, p)."""
    precision = jacobian.T @ (curvature[:, None] * jacobian)
    precision = precision + prior_precision * torch.eye(jacobian.shape[1], dtype=jacobian.dtype)
    return torch.linalg.inv(precision)


def margin_variance(candidate_jacobian: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Var[d] = j^T Sigma j for each candidate pair's margin Jacobian row j: (m, p), (p, p) -> (m,)."""
    return ((candidate_jacobian @ covariance) * candidate_jacobian).sum(-1)


def bald(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Expected information (bits) an answer gives about the weights, for a margin d ~ N(mean, variance) and
    P(a preferred) = sigmoid(d): H[E p] - E[H[p]] (Houlsby et al. 2011, "Bayesian active learning for
    classification and preference learning", eq. (3)-(4)), with the logistic read as a probit of scale
    sqrt(pi / 8) and C = sqrt(pi ln 2 / 2). 0 when variance is 0; large for an uncertain margin near 0."""
    scale = math.pi / 8
    m, s2 = mean * math.sqrt(scale), variance.clamp_min(0) * scale
    c2 = math.pi * math.log(2) / 2
    p = torch.special.ndtr(m / torch.sqrt(1 + s2)).clamp(1e-12, 1 - 1e-12)
    entropy = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
    expected_entropy = math.sqrt(c2) / torch.sqrt(s2 + c2) * torch.exp(-m * m / (2 * (s2 + c2)))
    return (entropy - expected_entropy).clamp_min(0)


def greedy_most_uncertain(candidate_jacobian: torch.Tensor, covariance: torch.Tensor, curvature: torch.Tensor, k: int, mean: torch.Tensor | None = None) -> list[int]:
    """Pick k candidates one at a time, each the one whose margin has the largest posterior variance given the
    answers to the ones picked before it: after asking j (curvature c, its expected p (1 - p)) the covariance is
    Sigma - c r r^T / (1 + c j^T r) with r = Sigma j (Sherman-Morrison), so that one batch does not ask k
    near-copies of one question. Each pick costs O(m p) after one (m, p) x (p, p) product. With `mean` (each
    candidate's fitted margin) the score is `bald(mean, variance)` instead of the variance. Returns candidate
    indices in the order picked."""
    base = candidate_jacobian @ covariance  # (m, p): row i is (Sigma_0 j_i)^T
    variance = (base * candidate_jacobian).sum(-1)
    directions: list[torch.Tensor] = []  # r_s / sqrt(1 + c_s j_s . r_s) * sqrt(c_s): Sigma_t = Sigma_0 - sum u u^T
    picked: list[int] = []
    available = torch.ones(len(candidate_jacobian), dtype=torch.bool)
    for _ in range(min(k, len(candidate_jacobian))):
        score = variance if mean is None else bald(mean, variance)
        best = int(score.masked_fill(~available, -math.inf).argmax())
        picked.append(best)
        available[best] = False
        row = base[best].clone()
        for u in directions:
            row = row - u * (u @ candidate_jacobian[best])
        c = curvature[best]
        u = row * torch.sqrt(c / (1 + c * (candidate_jacobian[best] @ row)))
        directions.append(u)
        variance = variance - (candidate_jacobian @ u) ** 2
    return picked


__all__ = [
    "OUTCOMES", "bald", "davidson_log_probabilities", "davidson_nll", "greedy_most_uncertain", "laplace_covariance",
    "margin_variance", "outcome_index", "rao_kupper_probabilities",
]  # fmt: skip
