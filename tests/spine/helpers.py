"""Networks used across the spine tests."""

import torch
from torch import nn

import wsnets


def architectures():
    """(name, Architecture, input_shape) for the families the spine must support."""
    return [
        ("mlp", wsnets.mlp(12, [16, 8], 5, "relu"), (12,)),
        ("mlp-bn", wsnets.mlp(12, [16, 8], 5, "tanh", batchnorm=True), (12,)),
        ("mlp-ln", wsnets.mlp(12, [16], 5, "gelu", layernorm=True), (12,)),
        ("cnn2d", wsnets.cnn(3, [4, 6], 5), (3, 8, 8)),
        ("cnn2d-bn", wsnets.cnn(2, [4, 6], 5, batchnorm=True, kernel_size=[3, 5]), (2, 9, 9)),
        ("cnn1d-bn", wsnets.cnn(2, [4, 6], 3, dims=1, batchnorm=True, kernel_size=5), (2, 20)),
    ]


def random_ws(arch, seed=0):
    return wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(seed))


class Custom(nn.Module):
    """A custom container whose forward applies children in registration order."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Skippy(Custom):
    """Registration order lies about the forward: the activation is never applied."""

    def forward(self, x):
        return self.fc2(self.fc1(x))


def dag_models():
    """(name, module, input_shape) for the non-sequential families of issue 18 (small, seeded, BatchNorm
    statistics randomized so permutations of them matter)."""
    from wsnets import models as M
    torch.manual_seed(0)
    tiny_bert = M.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=20)
    out = [
        ("resmlp", M.ResidualMLP(12, 8, 2, 5), (12,)),
        ("resmlp-bn", M.ResidualMLP(12, 8, 1, 5, norm="batchnorm"), (12,)),
        ("resnet", M.small_resnet(5, widths=(4, 6), in_channels=2), (2, 8, 8)),
        ("transformer", M.Transformer(8, 16, 2, 2, 32, 5), (5, 8)),
        ("vit", M.ViT(8, 4, 1, 16, 2, 1, 32, 5), (1, 8, 8)),
        ("encoder-layer", nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), (5, 16)),
        ("bert-block", M.BertLayer(M.BertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)), (5, 16)),
        ("bert", M.Bert(tiny_bert), (7,)),
        ("concat", M.ConcatMLP(12, 6, 10, 5), (12,)),
    ]
    for _, m, _ in out:
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                with torch.no_grad():
                    mod.running_mean.normal_()
                    mod.running_var.uniform_(0.5, 1.5)
                    mod.weight.normal_()
                    mod.bias.normal_()
        m.eval()
    return out


DAG_IDS = [d[0] for d in dag_models()]
