"""Pooling of spatial feature maps (B, C, H, W) and token sequences (B, N, C), and the fine-tuning head.

GeM (generalised mean; Radenovic, Tolias and Chum, TPAMI 2019, "Fine-tuning CNN Image Retrieval with No Human
Annotation"): ``(mean x^p)^(1/p)`` with p=3 learnable, eps=1e-6. p=1 is average pooling, p -> inf max pooling.

CNN maps after a ReLU are non-negative, so the published form (clamp to eps, then the power) is exact there.
Transformer tokens are signed: clamping them throws away every negative component. For signed inputs we use the
*signed* power mean ``sign(m) |m|^(1/p)`` with ``m = mean(sign(x) |x|^p)``: identical to GeM on non-negative
inputs, still average pooling at p=1, and it keeps the sign and magnitude of negative activations.
"""

from __future__ import annotations

import torch
from torch import nn

POOL_CHOICES = ("gap", "gem", "cls", "mean", "max")
#: GeM defaults from Radenovic et al. (TPAMI 2019).
GEM_P = 3.0
GEM_EPS = 1e-6
#: GeM's exponent is kept at 1 or more: p=1 is average pooling, below 1 it is no longer a pooling of the map's
#: magnitudes (and p -> 0 divides by zero).
GEM_P_MIN = 1.0


def gem(x: torch.Tensor, p: torch.Tensor | float = GEM_P, eps: float = GEM_EPS, dim: tuple[int, ...] = (-2, -1),
        signed: bool = False) -> torch.Tensor:
    """Generalised mean over ``dim``. ``signed=True`` uses the sign-preserving form for signed inputs."""
    if signed:
        powered = torch.sign(x) * x.abs().clamp(min=eps).pow(p)
        mean = powered.mean(dim=dim)
        return torch.sign(mean) * mean.abs().clamp(min=eps).pow(1.0 / p)
    return x.clamp(min=eps).pow(p).mean(dim=dim).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent ``p`` (p=3, eps=1e-6 by default; Radenovic et al. 2019).

    Input (B, C, H, W) for maps (pooled over H, W) or (B, N, C) for tokens (``tokens=True``, pooled over N).
    ``signed=None`` chooses the signed form for tokens and the clamped form for maps.
    """

    def __init__(self, p: float = GEM_P, eps: float = GEM_EPS, learnable: bool = True, tokens: bool = False,
                 signed: bool | None = None) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p))) if learnable else torch.tensor(float(p))
        self.eps = eps
        self.tokens = tokens
        self.signed = tokens if signed is None else signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = (1,) if self.tokens else (-2, -1)
        p = self.p.float().clamp(min=GEM_P_MIN) if isinstance(self.p, torch.Tensor) else max(GEM_P_MIN, self.p)
        return gem(x.float(), p, self.eps, dim, self.signed).to(x.dtype)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the learnable exponent at :data:`GEM_P_MIN` or more (called after every optimiser step)."""
        if isinstance(self.p, nn.Parameter):
            self.p.clamp_(min=GEM_P_MIN)

    def extra_repr(self) -> str:
        p = float(self.p.detach()) if isinstance(self.p, torch.Tensor) else self.p
        return f"p={p:.3f}, eps={self.eps}, tokens={self.tokens}, signed={self.signed}"


def pool_map(x: torch.Tensor, mode: str, gem_module: GeM | None = None) -> torch.Tensor:
    """Pool a (B, C, H, W) map to (B, C)."""
    if mode in ("gap", "mean"):
        return x.mean(dim=(-2, -1))
    if mode == "max":
        return x.amax(dim=(-2, -1))
    if mode == "gem":
        return (gem_module or GeM(learnable=False))(x)
    raise ValueError(f"pooling {mode!r} does not apply to a feature map (choose gap, gem, max)")


def pool_tokens(tokens: torch.Tensor, mode: str, num_prefix_tokens: int = 1, gem_module: GeM | None = None
                ) -> torch.Tensor:
    """Pool a (B, N, C) token sequence to (B, C): ``cls`` the first token, ``mean``/``gap`` the mean of the patch
    tokens, ``gem`` the signed GeM of the patch tokens, ``max`` their maximum."""
    if mode == "cls":
        return tokens[:, 0]
    patches = tokens[:, num_prefix_tokens:]
    if mode in ("mean", "gap"):
        return patches.mean(dim=1)
    if mode == "max":
        return patches.amax(dim=1)
    if mode == "gem":
        return (gem_module or GeM(learnable=False, tokens=True))(patches)
    raise ValueError(f"pooling {mode!r} does not apply to tokens (choose cls, mean, gem, max)")


class EmbeddingHead(nn.Module):
    """The fine-tuning head: ``Linear(in -> out, bias=False) -> BatchNorm1d -> Dropout(p) -> L2 normalisation``."""

    def __init__(self, in_dim: int, out_dim: int = 512, dropout: float = 0.1, normalize: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.normalize = normalize
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn(self.linear(x.float())))
        return nn.functional.normalize(x, dim=-1) if self.normalize else x
