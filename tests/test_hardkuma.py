import itertools

import pytest
import torch

from sparsedecode.roles.calibrate import DensityConstraint, lr_factor
from sparsedecode.roles.hardkuma import HardKuma
from sparsedecode.roles.heuristics import HardConcrete, SigmoidGate

DRAWS = 200_000


def gate_with(family: type, values: dict[str, list[float]], draws: int = 1) -> torch.nn.Module:
    """A gate of shape [draws, len(values)] whose column j has the parameters values[name][j]."""
    width = len(next(iter(values.values())))
    gate = family((draws, width))
    with torch.no_grad():
        for name, column in values.items():
            getattr(gate, name).copy_(torch.tensor(column).expand(draws, width))
    return gate


CASES = [
    (HardKuma, {"a": [1.0, 0.5, 3.0, 0.2, 5.0, 1.0], "b": [1.0, 2.0, 0.7, 0.3, 5.0, 20.0]}),
    (HardConcrete, {"log_alpha": [0.0, -2.0, 1.5, 4.0, -5.0]}),
]


@pytest.mark.parametrize("family,values", CASES)
def test_closed_forms_match_monte_carlo(family, values):
    gate = gate_with(family, values)
    with torch.no_grad():
        z = gate_with(family, values, DRAWS).sample(torch.Generator().manual_seed(0))
        assert torch.allclose(gate.prob_zero()[0], (z == 0).float().mean(0), atol=0.01)
        assert torch.allclose(gate.prob_one()[0], (z == 1).float().mean(0), atol=0.01)
        assert torch.allclose(gate.mean()[0], z.mean(0), atol=0.01)
        assert torch.allclose(gate.cost()[0], (z != 0).float().mean(0), atol=0.01)
    assert z.min() == 0 and z.max() == 1


def test_uniform_start():
    gate = HardKuma((3, 2))
    assert torch.allclose(gate.cost(), torch.tensor(11 / 12))
    assert torch.allclose(gate.mean(), torch.tensor(0.5), atol=1e-5)


@pytest.mark.parametrize("family", [HardKuma, HardConcrete, SigmoidGate])
def test_gradients_reach_the_parameters(family):
    gate = family((50, 4))
    z = gate.sample(torch.Generator().manual_seed(1))
    (z.sum() + gate.cost().sum()).backward()
    for p in gate.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()


def test_hardkuma_parameters_are_clamped():
    gate = HardKuma((2,))
    with torch.no_grad():
        gate.a.copy_(torch.tensor([-3.0, 500.0]))
        gate.b.copy_(torch.tensor([0.0, 1e9]))
    gate.clamp_()
    assert gate.a.tolist() == pytest.approx([1e-6, 100.0]) and gate.b.tolist() == pytest.approx([1e-6, 100.0])


def test_lambda_rises_while_density_is_above_target():
    constraint = DensityConstraint(target=0.1)
    lambdas = []
    for _ in range(50):
        density = torch.tensor(0.5, requires_grad=True)
        term = constraint(density)
        term.backward()
        assert density.grad == pytest.approx(constraint.lam)  # the moving average changes the value only
        lambdas.append(constraint.lam)
    assert lambdas[0] > 2.0 and all(b > a for a, b in itertools.pairwise(lambdas))
    below = torch.tensor(0.05, requires_grad=True)
    constraint(below).backward()
    assert below.grad == 0


def test_lr_schedule():
    factors = [lr_factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == 1.0
    assert all(f == 1.0 for f in factors[20:80])
    assert factors[-1] == pytest.approx(0.1) and all(b < a for a, b in itertools.pairwise(factors[80:]))
