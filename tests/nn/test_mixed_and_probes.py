"""Mixed-activation batches for fixed-shape encoders, and probe features (graph encoders, HNP)."""

import pytest
import torch

import wsnets
from wsnets.errors import ArchitectureMismatchError, ConfigError
from wsnets.functional import forward
from wsnets.nn import HNPEncoder, NeuralGraphEncoder, NeuralGraphTransformer, NPEncoder, build_encoder, represent
from wsnets.nn.probes import ProbeField, graph_probe_activations, input_shape, logit_features, probe_logits
from wsnets.testing import assert_invariant, assert_sensitive_to_inputs
from wsnets.weights import MixedBatch, activation_codes, stack_shapes

from .helpers import ARCHS, mixed, nets

RELU = wsnets.cnn(1, [4, 3], 3, "relu", kernel_size=3, dims=2, stride=2)
TANH = wsnets.cnn(1, [4, 3], 3, "tanh", kernel_size=3, dims=2, stride=2)


def _singles(seed=0):
    """relu and tanh CNNs of one shape, interleaved (as the Small CNN Zoo mixes them)."""
    a, b = nets(RELU, 3, seed), nets(TANH, 3, seed + 1)
    return [w for pair in zip(a, b) for w in pair]


def test_stack_shapes_mixes_activations_and_refuses_other_shapes():
    m = stack_shapes(_singles())
    assert isinstance(m, MixedBatch) and len(m) == 6
    assert activation_codes(m)[:, 0].tolist() == [1, 3] * 3        # relu, tanh per network, identity at the output
    assert activation_codes(m)[:, -1].tolist() == [0] * 6
    assert isinstance(stack_shapes(list(nets(RELU, 2))), wsnets.WeightSpace)   # one architecture: a plain stack
    with pytest.raises(ArchitectureMismatchError, match="differ in names or shapes"):
        stack_shapes(list(nets(RELU, 1)) + list(nets(wsnets.cnn(1, [4, 4], 3, kernel_size=3, dims=2), 1)))


@pytest.mark.parametrize("cls", [NPEncoder, HNPEncoder])
def test_fixed_shape_encoders_read_mixed_activations_invariantly(cls):
    singles = _singles()
    enc = build_encoder({"name": cls is HNPEncoder and "hnp" or "np", "hidden": 5, "layers": 1, "out_dim": 6}, singles)
    enc = enc.double().eval()
    singles = [w.map(torch.Tensor.double) for w in singles]
    assert enc(represent(enc, singles)).shape == (6, 6)
    assert_invariant(enc, singles, represent=stack_shapes)
    # the activation is a feature: the same weights labelled relu or tanh embed differently
    relu_only = stack_shapes([wsnets.WeightSpace(RELU, w.params) for w in singles])
    assert not torch.allclose(enc(relu_only), enc(stack_shapes(singles)))
    with pytest.raises(ArchitectureMismatchError, match="share shapes"):
        build_encoder({"name": "hnp"}, mixed())


def test_probe_activations_match_a_forward_pass_of_each_network():
    """Reference: the batched functional forward of each network alone, in the graph's node order."""
    arch = wsnets.Architecture(wsnets.cnn(1, [4, 3], 3, "tanh", kernel_size=3, dims=2, stride=2,
                                          batchnorm=True).layers, (1, 8, 8))
    singles = [nets(wsnets.mlp(6, [5, 4], 3), 1)[0], nets(arch, 1, 1)[0], nets(wsnets.mlp(6, [5, 4], 3), 1, 2)[0]]
    field = ProbeField(4).double()
    batch = wsnets.to_batch([w.map(torch.Tensor.double) for w in singles])
    acts, summary = graph_probe_activations(batch, field)
    for i, w in enumerate(singles):
        probes = field(input_shape(w.arch))
        hidden: dict = {}
        out = forward(w.arch, w.batched().map(torch.Tensor.double).params, probes, activations=hidden)[0]   # [P, C]
        inputs = probes.flatten(2).mean(2) if probes.dim() > 2 else probes
        groups = [inputs] + [h[0].flatten(2).mean(2) if h.dim() > 3 else h[0] for _, h in sorted(hidden.items())] + [out]
        ref = torch.cat([g.t() for g in groups])                            # [nodes, P]
        torch.testing.assert_close(acts[batch.ptr[i]:batch.ptr[i + 1]], ref)
    assert summary.shape == (3, 12)


def test_probe_logits_of_residual_networks_and_transformers_match_their_forward_pass():
    """DAG networks are rebuilt from a mixed graph batch: their output nodes carry the logits of the stored
    network (reference: the functional forward of each network alone), and the summary is theirs."""
    from wsnets.models import ViT
    from wsnets.models.families import WildCNN
    from wsnets.nn.probes import output_summary
    from wsnets.trace import trace
    res = trace(WildCNN(depth=3, width=4, residual=True, batchnorm=True, downsample="stride"), (1, 8, 8))
    vit = trace(ViT(patch=4, dim=8, heads=2, depth=2, hidden=16, activation="gelu"), (1, 8, 8))
    singles = [nets(res, 1, 0)[0], nets(ARCHS["mlp"], 1, 1)[0], nets(vit, 1, 2)[0], nets(res, 1, 3)[0],
               nets(vit, 1, 4)[0]]
    singles = [w.map(lambda t: t + 0.1 * torch.randn_like(t)).map(torch.Tensor.double) for w in singles]
    field = ProbeField(4).double()
    batch = wsnets.to_batch(singles)
    acts, summary = graph_probe_activations(batch, field)
    for i, w in enumerate(singles):
        if w.arch.is_chain:
            continue
        ref = forward(w.arch, w.batched().params, field(input_shape(w.arch)))     # [1, P, C]
        a = acts[batch.ptr[i]:batch.ptr[i + 1]]
        out = batch.node_type[batch.ptr[i]:batch.ptr[i + 1]] == 2
        torch.testing.assert_close(a[out], ref[0].t())
        assert a[~out].abs().sum() == 0
        torch.testing.assert_close(summary[i], output_summary(ref)[0].to(summary.dtype))


def test_probe_activations_follow_relabeled_neurons():
    singles = list(nets(ARCHS["mlp"], 3))
    field = ProbeField(3).double()
    perm = [wsnets.permute(w, {1: torch.randperm(5), 2: torch.randperm(4)}) for w in singles]
    a, _ = graph_probe_activations(wsnets.to_batch([w.map(torch.Tensor.double) for w in singles]), field)
    b, _ = graph_probe_activations(wsnets.to_batch([w.map(torch.Tensor.double) for w in perm]), field)
    assert not torch.allclose(a, b)                                        # hidden rows moved...
    torch.testing.assert_close(a.sort(0).values, b.sort(0).values)        # ...and nothing else changed
    torch.testing.assert_close(a[:6], b[:6])                               # inputs keep their place
    torch.testing.assert_close(a[-3:], b[-3:])                             # outputs too


GRAPH_ENCODERS = {"pna": lambda **kw: NeuralGraphEncoder(hidden=8, layers=1, out_dim=6, **kw),
                  "transformer": lambda **kw: NeuralGraphTransformer(hidden=8, layers=1, heads=2, out_dim=6, **kw)}


@pytest.mark.parametrize("name", list(GRAPH_ENCODERS))
def test_graph_encoder_with_probes_is_invariant_and_sees_inputs(name):
    enc = GRAPH_ENCODERS[name](probes=3).double().eval()
    nets_ = [w.map(torch.Tensor.double) for w in mixed()]
    assert enc(wsnets.to_batch(nets_)).shape == (8, 6)
    assert_invariant(enc, nets_)
    assert_sensitive_to_inputs(enc, wsnets.stack([w for w in nets_ if w.arch == ARCHS["mlp"]]))


@pytest.mark.parametrize("name", list(GRAPH_ENCODERS))
def test_graph_encoder_probe_hidden_false_feeds_only_the_logits(name):
    enc = GRAPH_ENCODERS[name](probes=3, probe_hidden=False).double().eval()
    nets_ = [w.map(torch.Tensor.double) for w in mixed()]
    batch = wsnets.to_batch(nets_)
    seen = {}
    enc.featurizer.register_forward_hook(lambda m, args, out: seen.update(acts=args[1]))
    enc(batch)
    full, _ = graph_probe_activations(batch, enc.probe_field)
    out = batch.node_type == 2
    assert seen["acts"][~out].abs().sum() == 0 and full[~out].abs().sum() > 0
    torch.testing.assert_close(seen["acts"][out], full[out])
    assert_invariant(enc, nets_)


def test_probes_learn_and_hnp_with_probes_stays_invariant():
    ws = nets(RELU, 4).map(torch.Tensor.double)
    enc = HNPEncoder(RELU, hidden=4, layers=1, out_dim=5, probes=3).double()
    assert_invariant(enc.eval(), ws, represent=lambda w: w)
    enc.train()
    enc(ws).square().sum().backward()
    assert enc.probe_field.mlp[-1].weight.grad.abs().sum() > 0            # the probes get a gradient
    with pytest.raises(ConfigError, match="fixed output neurons"):
        NPEncoder.__mro__[1](RELU, fixed_io=False, probes=2)


def test_probe_field_is_deterministic_per_shape_and_logit_features_are_scale_free():
    f1, f2 = ProbeField(5), ProbeField(5)
    torch.testing.assert_close(f1((1, 8, 8)), f2((1, 8, 8)))              # starts from the same noise
    assert f1((1, 8, 8)).shape == (5, 1, 8, 8) and f1((64,)).shape == (5, 64)
    ws = nets(ARCHS["mlp"], 2)
    last = ws.arch.weight_layers[-1].name
    big = wsnets.WeightSpace(ws.arch, {k: 3 * v if k.startswith(f"{last}.") else v for k, v in ws.params.items()}, 2)
    a, b = logit_features(probe_logits(ws, f1)), logit_features(probe_logits(big, f1))   # logits x 3
    torch.testing.assert_close(a[:, :15], b[:, :15])                        # normalized logits unchanged
    torch.testing.assert_close(b[:, 15] - a[:, 15], torch.full((2,), float(torch.log(torch.tensor(3.0)))))
    assert not torch.allclose(a[:, 16:], b[:, 16:])                         # confidence is not scale-free
