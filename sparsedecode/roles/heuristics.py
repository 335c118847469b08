"""The baselines HardKuma is measured against (the paper's head-identification ablation), each giving the
same number of retrieval units: Hard Concrete gates and a continuous sigmoid gate (trained by the same
loop as HardKuma, `calibrate.calibrate`), and a training-free score, the attention mass each KV head puts
on a passkey while the model recites it.
"""
from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import track
from torch import nn

from ..models.loader import LoadedModel
from .hardkuma import HardKuma, StretchedGate
from .head_roles import HeadRoles
from .passes import answer_hidden_states, new_cache, prefill_context
from .passkey import PasskeyPrompts, PasskeySample
from .readoff import check_target, roles_from_scores

ATTENTION_MASS = "attention-mass"  # the training-free baseline, chosen like a gate family


class HardConcrete(StretchedGate):
    """Louizos et al. (2018): s = sigmoid((log u - log(1 - u) + log_alpha) / beta), stretched and clamped
    like HardKuma; F(s) = sigmoid(beta * logit(s) - log_alpha). log_alpha = 0 at the start (E[z] = 0.5,
    like HardKuma's start); beta = 2/3 as in the paper."""

    BETA = 2.0 / 3.0

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(shape))

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((torch.logit(u) + self.log_alpha) / self.BETA)

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.BETA * torch.logit(s) - self.log_alpha)


class SigmoidGate(nn.Module):
    """Direct optimisation, DuoAttention-style: a deterministic gate z = sigmoid(logit) in (0, 1). Its cost
    is z itself, so the density term is the L1 norm of the gates, held to the target by the same
    Lagrangian as the L0 gates. Starts at z = 0.5."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(shape))

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def cost(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def clamp_(self) -> None:
        """Unbounded logits: nothing to project."""


#: the gate families `calibrate(gate=...)` trains
GATES: dict[str, type[nn.Module]] = {"hardkuma": HardKuma, "hardconcrete": HardConcrete, "continuous": SigmoidGate}


def attention_mass_roles(
    loaded: LoadedModel, prompts: PasskeyPrompts, target_retrieval: int, samples: int, progress: bool = True
) -> HeadRoles:
    """Training-free roles: run `samples` passkey prompts densely; score each (layer, KV head) by the
    attention mass its query heads (mean over the group) put on the tokens of needle j while the answer
    recites key j (the answer positions whose next token belongs to key j), summed over keys, averaged
    over prompts; the `target_retrieval` best units outside layer 0 become retrieval heads."""
    config, model = loaded.config, loaded.model
    check_target(config, target_retrieval, None)
    cache = new_cache(loaded, prompts.max_length)
    scores = torch.zeros(config.num_layers, config.num_kv_heads)
    for _ in track(range(samples), "scoring heads", disable=not progress, console=Console(stderr=True)):
        sample = prompts.sample()
        prefill_context(model, cache, sample.prompt)

        def on_attention(layer: int, probs: torch.Tensor, sample: PasskeySample = sample) -> None:
            for (needle_start, needle_end), (key_start, key_end) in zip(sample.needle_spans, sample.key_spans):
                reciting = probs[:, :, max(key_start - 1, 0) : key_end - 1, needle_start:needle_end]
                scores[layer] += reciting.sum(-1).mean((1, 2)).cpu()

        with torch.no_grad():
            answer_hidden_states(model, cache, len(sample.prompt), sample.answer, on_attention=on_attention)
    scores /= samples
    source = {"method": ATTENTION_MASS, "samples": samples, "scores": [[round(float(v), 5) for v in r] for r in scores]}
    return roles_from_scores(scores[1:], config, target_retrieval, source)
