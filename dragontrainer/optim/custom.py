"""Optimisers torch.optim does not have, written from the papers' update equations.

All three keep L2 weight decay in the gradient (g += λθ), like torch's Adam, so `optim.weight_decay`
means the same thing for every adaptive optimiser here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _AdamFamily(torch.optim.Optimizer):
    """Shared bookkeeping: first and second moments, a step count, coupled weight decay."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    self.init_state(state, param)
                state["step"] += 1
                self.update(param, grad, state, group)
        return loss

    def init_state(self, state: dict, param: torch.Tensor) -> None:
        return None

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError


class AdamNoBiasCorrection(_AdamFamily):
    """Adam without bias correction: θ -= lr·m/(√v + ε). Early steps are far too large when β2 ≈ 1
    (m and v start at 0, v much slower), which is the reference texts' point about bias correction."""

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-group["lr"])


class AdaBelief(_AdamFamily):
    """AdaBelief (Zhuang et al. 2020): the second moment tracks (g − m)², the 'belief' in the gradient.

    m_t = β1·m + (1−β1)·g;  s_t = β2·s + (1−β2)·(g − m_t)² + ε;
    θ -= lr · (m_t/(1−β1^t)) / (√(s_t/(1−β2^t)) + ε)
    """

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        m, s = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        diff = grad - m
        s.mul_(beta2).addcmul_(diff, diff, value=1 - beta2).add_(group["eps"])
        m_hat = m / (1 - beta1**step)
        denom = (s / (1 - beta2**step)).sqrt_().add_(group["eps"])
        param.addcdiv_(m_hat, denom, value=-group["lr"])


class DiffGrad(_AdamFamily):
    """diffGrad (Dubey et al. 2019): Adam's step scaled by a friction ξ = sigmoid(|g_{t−1} − g_t|).

    Where the gradient changes little (near an optimum) ξ → 0.5 and the step slows; where it changes
    fast ξ → 1 and the step is Adam's. θ -= lr · ξ · m̂/(√v̂ + ε), with g_0 = 0.
    """

    def init_state(self, state: dict, param: torch.Tensor) -> None:
        state["previous_grad"] = torch.zeros_like(param)

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        friction = torch.sigmoid((state["previous_grad"] - grad).abs())
        state["previous_grad"] = grad.clone()
        m_hat = m / (1 - beta1**step)
        denom = (v / (1 - beta2**step)).sqrt_().add_(group["eps"])
        param.addcdiv_(friction * m_hat, denom, value=-group["lr"])
