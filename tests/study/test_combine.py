"""The combination rules on hand-made logits: the documented results, ties included."""

from __future__ import annotations

import math

import torch

from dragontrainer.study.combine import VOTE_FLOOR, combine, expected_calibration_error, fit_weights, scores


def logits_of(*rows: list[list[float]]) -> torch.Tensor:
    """Members given as probabilities; their logs are valid logits (softmax(log p) = p)."""
    return torch.tensor(rows).log()


def test_mean_averages_probabilities_and_logit_averages_logits() -> None:
    member_a = [[0.9, 0.1], [0.4, 0.6]]
    member_b = [[0.3, 0.7], [0.2, 0.8]]
    logits = logits_of(member_a, member_b)
    mean, mean_class = combine(logits, "mean")
    assert torch.allclose(mean, torch.tensor([[0.6, 0.4], [0.3, 0.7]]))
    assert mean_class.tolist() == [0, 1]
    geometric, logit_class = combine(logits, "logit")
    first = math.sqrt(0.9 * 0.3) / (math.sqrt(0.9 * 0.3) + math.sqrt(0.1 * 0.7))
    assert math.isclose(float(geometric[0, 0]), first, rel_tol=1e-5)
    assert logit_class.tolist() == [0, 1]  # 0.52 vs 0.48 on image 0: logit agrees with mean here
    weighted, _ = combine(logits, "mean", torch.tensor([0.25, 0.75]))
    assert torch.allclose(weighted[0], torch.tensor([0.25 * 0.9 + 0.75 * 0.3, 0.25 * 0.1 + 0.75 * 0.7]))


def test_mean_and_logit_can_disagree() -> None:
    """One very confident member against two mild ones: the logit mean (a sum of log-odds) follows the
    confident one, the probability mean and the vote follow the two."""
    logits = logits_of([[0.001, 0.999]], [[0.8, 0.2]], [[0.8, 0.2]])
    assert combine(logits, "mean")[1].tolist() == [0]  # p0 = (0.001 + 0.8 + 0.8) / 3 = 0.534
    assert combine(logits, "logit")[1].tolist() == [1]  # log-odds of 1: 6.9 − 1.39 − 1.39 > 0
    assert combine(logits, "vote")[1].tolist() == [0]


def test_vote_counts_top_classes_and_breaks_ties_by_mean_probability() -> None:
    logits = logits_of(
        [[0.6, 0.3, 0.1], [0.5, 0.45, 0.05]],
        [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7]],
        [[0.2, 0.7, 0.1], [0.05, 0.9, 0.05]],
    )
    shares, classes = combine(logits, "vote")
    assert classes.tolist()[0] == 1  # two votes for class 1
    assert torch.allclose(shares[0], torch.tensor([1 / 3, 2 / 3, 0.0]))
    # image 1: one vote each; mean probabilities 0.217, 0.517, 0.267: the tie goes to class 1
    assert classes.tolist()[1] == 1
    # a class with no vote: its NLL uses the documented floor
    metrics = scores(shares, classes, torch.tensor([2, 1]), "vote")
    assert math.isclose(metrics["nll"], (-math.log(VOTE_FLOOR) - math.log(1 / 3)) / 2, rel_tol=1e-6)
    _, weighted = combine(logits, "vote", torch.tensor([0.6, 0.2, 0.2]))
    assert weighted.tolist() == [0, 0]  # member 0 outweighs the two others together


def test_scores_and_calibration_error() -> None:
    probabilities = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    predictions = probabilities.argmax(1)
    metrics = scores(probabilities, predictions, labels, "mean")
    assert metrics["accuracy"] == 0.75
    assert math.isclose(
        metrics["nll"], -(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.55)) / 4, rel_tol=1e-6
    )
    # bins of width 1/15: 0.9 -> correct, 0.6 -> wrong, 0.8 -> correct, 0.55 -> correct, each alone in its bin
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8) + abs(1 - 0.55)) / 4
    assert math.isclose(metrics["ece"], expected, rel_tol=1e-5)
    perfect = expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert perfect == 0.0


def test_fitted_weights_favour_the_member_that_is_right() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=generator)
    good = torch.nn.functional.one_hot(labels, 3).float() * 4
    noise = torch.randn(200, 3, generator=generator) * 3
    weights = fit_weights(torch.stack([good, noise]), labels, "mean")
    assert float(weights.sum()) == 1.0 or math.isclose(float(weights.sum()), 1.0, rel_tol=1e-6)
    assert weights[0] > 0.8
