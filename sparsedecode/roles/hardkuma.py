"""Stochastic gates that learn which KV heads must stay retrieval heads: the HardKuma distribution of
LycheeDecode (Kumaraswamy, stretched to (-0.1, 1.1) and clamped to [0, 1]) and the shared machinery of
stretched-and-clamped gates.

A unit's gate z mixes its dense (retrieval) and sparse attention; z is exactly 0 or 1 with positive
probability, so the expected number of non-zero gates is an L0 count that a constraint can hold down.
"""
from __future__ import annotations

import torch
from torch import nn

STRETCH = (-0.1, 1.1)  # (l, r): s in (0, 1) is stretched to (l, r), then clamped to [0, 1]
SAMPLE_RANGE = (0.001, 0.999)  # u is drawn from this range, as in the reference: keeps powers and logs finite
QUADRATURE_POINTS = 2049


class StretchedGate(nn.Module):
    """z = clamp(l + (r - l) s, 0, 1) with s drawn from a distribution on (0, 1) that a subclass defines by
    its CDF and quantile function (both differentiable in the parameters). Parameters have the shape of
    the units, one gate per unit."""

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One z per unit, differentiable in the parameters (reparameterised). u comes from a CPU
        generator so that a run is reproducible on any device."""
        low, high = SAMPLE_RANGE
        u = low + (high - low) * torch.rand(self.shape, generator=generator, dtype=torch.float64)
        s = self.quantile(u.to(self.device, torch.float32))
        l, r = STRETCH
        return (l + (r - l) * s).clamp(0.0, 1.0)

    def _cdf_of_z(self, x: float | torch.Tensor) -> torch.Tensor:
        """P(l + (r - l) s <= x): the CDF of the stretched variable, per unit."""
        l, r = STRETCH
        return self.cdf(torch.as_tensor((x - l) / (r - l), dtype=torch.float32, device=self.device))

    def prob_zero(self) -> torch.Tensor:
        return self._cdf_of_z(0.0)

    def prob_one(self) -> torch.Tensor:
        return 1.0 - self._cdf_of_z(1.0)

    def cost(self) -> torch.Tensor:
        """Per unit, the term of the expected density: P(z != 0), the expected L0 norm."""
        return 1.0 - self.prob_zero()

    def mean(self) -> torch.Tensor:
        """E[z] per unit = integral over x in [0, 1] of P(z > x), by the trapezoid rule on 2049 points
        (the integrand is smooth on [0, 1] because s stays inside (1/12, 11/12) there; error < 1e-6).
        u is taken on all of (0, 1) here; sampling's cut to (0.001, 0.999) moves E[z] by < 0.001."""
        x = torch.linspace(0.0, 1.0, QUADRATURE_POINTS, device=self.device)
        survival = 1.0 - self._cdf_of_z(x.view(-1, *([1] * len(self.shape))))
        return torch.trapezoid(survival, x, dim=0)

    def clamp_(self) -> None:
        """Project the parameters back into their valid range after an optimiser step."""

    @property
    def shape(self) -> torch.Size:
        return next(self.parameters()).shape

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class HardKuma(StretchedGate):
    """Kumaraswamy(a, b) stretched and clamped: s = (1 - (1 - u)^(1/b))^(1/a), F(s) = 1 - (1 - s^a)^b.
    a = b = 1 at the start (s uniform: E[z] = 0.5, P(z != 0) = 11/12); a, b are kept in [1e-6, 100]."""

    BOUNDS = (1e-6, 100.0)

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(shape))
        self.b = nn.Parameter(torch.ones(shape))

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        return (1.0 - (1.0 - u).pow(1.0 / self.b)).pow(1.0 / self.a)

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - s.pow(self.a)).pow(self.b)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.a.clamp_(*self.BOUNDS)
        self.b.clamp_(*self.BOUNDS)
