"""NeuralGraphTransformer's attention layer against a loop over graphs, heads, neuron pairs and edges."""

import math

import torch

import wsnets
from wsnets.nn import NeuralGraphTransformer
from wsnets.nn.transformer import attention_groups, plan_groups

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


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def test_attention_groups_are_the_cheapest_partition_of_the_batch():
    """plan_groups' dynamic program over sorted sizes against every partition of the graphs."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        sizes = torch.randint(1, 60, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
        heads, overhead = 2, int(torch.randint(0, 4000, (1,), generator=gen))

        def cost(parts):
            return sum(heads * len(g) * max(sizes[i] for i in g) ** 2 + overhead for g in parts)

        got = plan_groups(sizes, heads, overhead)
        assert sorted(i for g in got for i in g) == list(range(len(sizes)))
        assert cost(got) == min(cost(p) for p in _set_partitions(list(range(len(sizes)))))


def test_grouped_attention_gives_the_dense_batch_values_and_gradients(monkeypatch):
    import wsnets.nn.transformer as T
    torch.manual_seed(1)
    enc = NeuralGraphTransformer(hidden=8, layers=2, heads=2, out_dim=4).double()
    nets = [w.map(torch.Tensor.double) for w in mixed()]
    batch = wsnets.to_batch(nets + nets[:2])
    sizes = torch.bincount(batch.batch).tolist()
    assert len(set(sizes)) > 2
    groups = attention_groups(batch.batch, batch.edge_index, heads=2, overhead=0)
    assert groups is not None and len(groups.parts) > 1
    outs = {}
    for name, plan in (("dense", None), ("grouped", groups)):
        monkeypatch.setattr(T, "attention_groups", lambda *a, plan=plan, **k: plan)
        enc.zero_grad()
        out = enc(batch)
        out.square().sum().backward()
        outs[name] = (out.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None])
    torch.testing.assert_close(outs["grouped"][0], outs["dense"][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(outs["grouped"][1], outs["dense"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
