"""How an ensemble turns its members' logits into one prediction, and how it is scored.

- `mean`  (default): p = Σ wₘ softmax(zₘ), the average of the members' probabilities;
- `logit`: p = softmax(Σ wₘ zₘ), the average of the logits (a geometric mean of the probabilities);
- `vote`:  each member votes for its top class with weight wₘ; the most votes win, a tie goes to the class
  with the higher mean probability; the probabilities are the vote shares, so their NLL (floored at
  VOTE_FLOOR) punishes confident wrong majorities.
Weights wₘ are equal unless fitted on the validation split (`fit_weights`), never on the test split.
"""

from __future__ import annotations

from typing import Any

import torch

COMBINE = ("mean", "logit", "vote")
VOTE_FLOOR = 1e-4  # a class no member voted for gets this probability in the NLL
ECE_BINS = 15


def equal_weights(members: int) -> torch.Tensor:
    return torch.full((members,), 1.0 / members)


def combine(
    logits: torch.Tensor, method: str, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, C), predicted classes (N,)) from member logits (M, N, C)."""
    if method not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {method!r}")
    logits = logits.float()
    w = (weights if weights is not None else equal_weights(len(logits))).float().view(-1, 1, 1)
    mean = (w * logits.softmax(-1)).sum(0)
    if method == "mean":
        return mean, mean.argmax(-1)
    if method == "logit":
        probabilities = (w * logits).sum(0).softmax(-1)
        return probabilities, probabilities.argmax(-1)
    votes = (w * torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()).sum(0)
    tied = votes >= votes.max(-1, keepdim=True).values - 1e-6
    predictions = torch.where(tied, mean, torch.full_like(mean, -1.0)).argmax(-1)
    return votes / votes.sum(-1, keepdim=True), predictions


def scores(
    probabilities: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, method: str
) -> dict[str, float]:
    """Accuracy, negative log-likelihood (no label smoothing) and expected calibration error."""
    floor = VOTE_FLOOR if method == "vote" else 1e-12
    picked = probabilities.gather(1, labels.view(-1, 1)).squeeze(1)
    correct = (predictions == labels).float()
    confidence = probabilities.gather(1, predictions.view(-1, 1)).squeeze(1)
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-picked.clamp_min(floor).log().mean()),
        "ece": expected_calibration_error(confidence, correct),
    }


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N)·|accuracy_b − confidence_b| over equal-width confidence bins (Guo et al. 2017)."""
    index = (confidence * bins).long().clamp(0, bins - 1)
    gap = torch.zeros(bins).index_add_(0, index, correct - confidence)
    return float(gap.abs().sum() / max(len(confidence), 1))


def fit_weights(logits: torch.Tensor, labels: torch.Tensor, method: str, steps: int = 300) -> torch.Tensor:
    """Member weights on the simplex minimising the validation NLL of the combination (`vote` is fitted
    as `mean`: votes have no gradient). Starts from equal weights."""
    target = "mean" if method == "vote" else method
    theta = torch.zeros(len(logits), requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    logits = logits.float().detach()
    for _ in range(steps):
        optimizer.zero_grad()
        probabilities, _ = combine(logits, target, theta.softmax(0))
        loss = -probabilities.gather(1, labels.view(-1, 1)).clamp_min(1e-12).log().mean()
        loss.backward()
        optimizer.step()
    return theta.detach().softmax(0)


def describe(method: str, weights: torch.Tensor | None) -> dict[str, Any]:
    return {"combine": method, "weights": None if weights is None else [round(float(w), 6) for w in weights]}
