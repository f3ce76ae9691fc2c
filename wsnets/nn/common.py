"""Small building blocks shared by the encoders: MLPs, sinusoidal encodings, input scaling."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def make_mlp(dims: Sequence[int], *, act: str = "gelu", dropout: float = 0.0, norm: bool = False,
             last_act: bool = False) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear`` through ``dims`` (``dims[0]`` in, ``dims[-1]`` out).

    ``norm`` puts a LayerNorm before each hidden activation; ``last_act`` also activates the output.
    """
    if len(dims) < 2:
        raise ValueError("make_mlp needs at least an input and an output size")
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2 or last_act:
            if norm:
                layers.append(nn.LayerNorm(dims[i + 1]))
            layers.append(ACT[act]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Transformer-style encoding of a real tensor ``[...]`` -> ``[..., dim]`` (``dim`` even).

    Frequencies are geometric from 1 to ``1/max_period``, so integer positions up to ``max_period``
    get distinct codes, and the code of position ``p`` does not depend on how many positions exist.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / max(half, 1))
    ang = x.float().unsqueeze(-1) * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def signed_log(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log1p(|x|)``: a monotone squashing that keeps sign and order (robust to outliers)."""
    return x.sign() * x.abs().log1p()
