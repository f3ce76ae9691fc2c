"""NeuralGraphTransformer's attention layer against a loop over graphs, heads, neuron pairs and edges."""

import math

import torch

import wsnets
from wsnets.nn import NeuralGraphTransformer

from .helpers import mixed


def _reference_attention(layer, h, e, batch, log_nodes):
    """The attention output ``[N, H]`` of :class:`RelationalAttentionLayer` written pair by pair."""
    src, dst = batch.edge_index
    nb, layer_of = batch.batch, batch.node_layer
    hn, en = layer.norm1(h), layer.norm_e(e)
    nh, hd = layer.heads, h.shape[1] // layer.heads
    q, k, v = layer.qkv(hn).reshape(-1, 3, nh, hd).unbind(1)                      # [N, nh, hd]
    b_fwd, b_bwd = layer.bias_fwd(en), layer.bias_bwd(en)                           # [E, nh]
    s_fwd, s_bwd = layer.value_fwd(en), layer.value_bwd(en)
    out = torch.zeros_like(q)
    for g in range(int(nb.max()) + 1):
        nodes = (nb == g).nonzero().squeeze(1).tolist()
        edges = (nb[src] == g).nonzero().squeeze(1).tolist()
        for head in range(nh):
            logit = {(i, j): float(q[i, head] @ k[j, head]) / math.sqrt(hd) + float(layer.hop.weight[
                max(-layer.max_hop, min(layer.max_hop, int(layer_of[j] - layer_of[i]))) + layer.max_hop, head])
                for i in nodes for j in nodes}
            extra = {}                      # (query, key) -> edge value scalars
            for t in edges:
                i, j = int(dst[t]), int(src[t])      # forward: the target queries its source
                logit[i, j] += float(b_fwd[t, head] + log_nodes[g] * layer.neighbour[0, head])
                extra.setdefault((i, j), []).append(float(s_fwd[t, head]))
                logit[j, i] += float(b_bwd[t, head] + log_nodes[g] * layer.neighbour[1, head])
                extra.setdefault((j, i), []).append(float(s_bwd[t, head]))
            for i in nodes:
                z = torch.tensor([logit[i, j] for j in nodes], dtype=h.dtype).softmax(0)
                for p, j in zip(z, nodes):
                    out[i, head] += p * (v[j, head] + sum(extra.get((i, j), [])) * layer.value_dir[head])
    return out.reshape(h.shape)


def test_attention_layer_matches_a_pairwise_loop():
    torch.manual_seed(0)
    enc = NeuralGraphTransformer(hidden=8, layers=1, heads=2, out_dim=4).double().eval()
    layer = enc.layers[0]
    with torch.no_grad():      # every logit bias in play, also the global heads' neighbour factor
        layer.neighbour.copy_(torch.tensor([[1.0, 0.3], [0.7, -0.2]]))
        batch = wsnets.to_batch([w.map(torch.Tensor.double) for w in mixed()[:3]])
        h, e, aux = enc.featurizer(batch)
        nb = aux["batch"]
        counts = torch.bincount(nb)
        aux["local"] = torch.arange(nb.numel()) - (counts.cumsum(0) - counts)[nb]
        aux["log_nodes"] = counts.double().log()
        captured = {}
        layer.out.register_forward_hook(lambda m, inp, out: captured.setdefault("att", inp[0]))
        h2, e2 = layer(h, e, batch, aux)
        want = _reference_attention(layer, h, e, batch, aux["log_nodes"])
    torch.testing.assert_close(captured["att"], want, rtol=1e-9, atol=1e-9)
    # the rest of the block: residual, FFN and edge update on the reference attention
    with torch.no_grad():
        h_ref = h + layer.out(want)
        h_ref = h_ref + layer.ffn(layer.norm2(h_ref))
        e_ref = layer.edge(layer.norm2(h_ref), layer.norm_e(e), e, *batch.edge_index)
    torch.testing.assert_close(h2, h_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(e2, e_ref, rtol=1e-9, atol=1e-9)

