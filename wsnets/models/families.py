"""Architecture families that zoo recipes draw from (``zoo/digits-wild.toml``, ``zoo/digits-vit.toml``).

Plain ``nn.Module``s, read by :func:`wsnets.trace.trace` like any user module: a recipe's architecture
draw builds one of these and traces it, so the zoo stores the traced :class:`~wsnets.arch.Architecture`
(a DAG for residual networks and transformers, a chain for plain CNNs) and a stored checkpoint loads
back into the same class with ``load_state_dict``.

=============  ==========================================================================================
``WildCNN``    a CNN Wild Park-style convnet (Kofinas et al. 2024): ``depth`` blocks of ``width`` channels,
               each a conv (plain) or a torchvision ``BasicBlock``-style residual block (residual), with
               or without BatchNorm, any activation, kernel 3 or 5; the second block downsamples (stride
               2 or a 2x2 max pooling before it), or nothing is downsampled; global average pooling and a
               linear head
``ViT``        (:class:`wsnets.models.ViT`) a pre-LN vision transformer for small images: a conv patch
               embedding, a class token and positional table, ``depth`` ``nn.TransformerEncoderLayer``
               blocks (``norm_first``, no dropout) of ``dim`` channels, ``heads`` heads and an MLP of
               ``mlp_ratio * dim`` units, a final LayerNorm, the class token or the token mean, a head
=============  ==========================================================================================

Residual blocks follow torchvision: ``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))`` with an
identity shortcut where shapes agree and a 1x1 convolution (+ BatchNorm) "projection" shortcut where
the block changes the width or the resolution (the first block, whose input is the image, and a
strided block). Without BatchNorm the convolutions have biases; with it they have none. The width is
the same in every block: on 8x8 inputs a convolution after the downsampling costs a quarter of one
before it, which keeps a zoo of thousands of these affordable on a CPU.

Examples
--------
>>> from wsnets.trace import trace
>>> arch = trace(WildCNN(depth=3, width=8, residual=True, downsample="stride"), (1, 8, 8))
>>> arch.describe().split(":")[0]
'resnet'
>>> trace(WildCNN(depth=2, width=4), (1, 8, 8)).is_chain
True
"""

from __future__ import annotations

from torch import nn
import torch

from ..errors import ConfigError

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU,
         "silu": nn.SiLU, "sigmoid": nn.Sigmoid}
DOWNSAMPLE = ("none", "stride", "maxpool")


def _act(name: str) -> nn.Module:
    try:
        return _ACTS[name]()
    except KeyError:
        raise ConfigError(f"activation {name!r} unknown (use {', '.join(_ACTS)})") from None


def _conv(cin: int, cout: int, k: int, stride: int, batchnorm: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=not batchnorm)


class ResBlock(nn.Module):
    """torchvision's ``BasicBlock`` with a choice of kernel, activation and BatchNorm."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, batchnorm: bool = True,
                 activation: str = "relu") -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = _conv(cin, cout, kernel_size, stride, batchnorm)
        self.bn1 = norm(cout)
        self.act1 = _act(activation)
        self.conv2 = _conv(cout, cout, kernel_size, 1, batchnorm)
        self.bn2 = norm(cout)
        self.act2 = _act(activation)
        self.shortcut = None
        if stride != 1 or cin != cout:  # projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not batchnorm), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + (x if self.shortcut is None else self.shortcut(x)))


class WildCNN(nn.Module):
    """A convnet of ``depth`` blocks on ``[in_channels, H, W]`` images (see the module docstring).

    Block 1 (the second) downsamples: ``downsample="stride"``: its first conv has stride 2;
    ``"maxpool"``: a 2x2 max pooling before it; ``"none"`` keeps the resolution (and a one-block
    network never downsamples). Plain networks (``residual=False``) are one ``nn.Sequential``
    (``body``), so they trace to a sequential chain.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, depth: int = 3, width: int = 8,
                 kernel_size: int = 3, residual: bool = False, batchnorm: bool = False, activation: str = "relu",
                 downsample: str = "none") -> None:
        super().__init__()
        if depth < 1 or width < 1 or kernel_size % 2 != 1:
            raise ConfigError(f"WildCNN needs depth >= 1, width >= 1 and an odd kernel; got {depth}, {width}, "
                              f"{kernel_size}")
        if downsample not in DOWNSAMPLE:
            raise ConfigError(f"downsample {downsample!r} unknown (use {', '.join(DOWNSAMPLE)})")
        mid = 1 if downsample != "none" and depth > 1 else -1
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(depth):
            cout = width
            stride = 2 if i == mid and downsample == "stride" else 1
            if i == mid and downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
            if residual:
                layers.append(ResBlock(cin, cout, kernel_size, stride, batchnorm, activation))
            else:
                layers.append(_conv(cin, cout, kernel_size, stride, batchnorm))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(_act(activation))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.body(x)), 1))
