"""Today's sequential networks pinned byte for byte (issue 18): the DAG redesign of the spine must keep
their architecture JSON, describe() key, permutation spec, neural graph (counts and every tensor) and the
bytes of the files wsnets writes, so existing zoos, shards and meta-models load unchanged.

The values were recorded from the sequential-only code before the redesign."""

import hashlib

import pytest
import torch

import wsnets
from wsnets.io import ARCH_KEY, BATCH_KEY, safetensors_bytes
from tests.spine.helpers import architectures

PINNED = {
    'mlp': (
        '{"layers":[{"kind":"linear","name":"0","in_features":12,"out_features":16},{"kind":"act","fn":"relu"},{"kind":"linear","name":"2","in_features":16,"out_features":8},{"kind":"act","fn":"relu"},{"kind":"linear","name":"4","in_features":8,"out_features":5}],"input_shape":[12]}',
        'mlp:12-16-8-5:relu', 41, 360, '4553b6deba6ff7a8', '54707e8421b1d04b'),
    'mlp-bn': (
        '{"layers":[{"kind":"linear","name":"0","in_features":12,"out_features":16},{"kind":"batchnorm","name":"1","in_features":16,"out_features":16},{"kind":"act","fn":"tanh"},{"kind":"linear","name":"3","in_features":16,"out_features":8},{"kind":"batchnorm","name":"4","in_features":8,"out_features":8},{"kind":"act","fn":"tanh"},{"kind":"linear","name":"6","in_features":8,"out_features":5}],"input_shape":[12]}',
        'mlp:12-16-8-5:tanh+bn', 41, 360, 'da5316bb4090d4fc', '98a3345ce8a41cc3'),
    'mlp-ln': (
        '{"layers":[{"kind":"linear","name":"0","in_features":12,"out_features":16},{"kind":"layernorm","name":"1","in_features":16,"out_features":16},{"kind":"act","fn":"gelu"},{"kind":"linear","name":"3","in_features":16,"out_features":5}],"input_shape":[12]}',
        'mlp:12-16-5:gelu+ln', 33, 272, 'ac9bbb5baedbbeeb', 'c0d72f9e3a7caf36'),
    'cnn2d': (
        '{"layers":[{"kind":"conv2d","name":"0","in_features":3,"out_features":4,"kernel_size":[3,3],"stride":[1,1],"padding":[1,1],"dilation":[1,1],"dims":2},{"kind":"act","fn":"relu"},{"kind":"conv2d","name":"2","in_features":4,"out_features":6,"kernel_size":[3,3],"stride":[1,1],"padding":[1,1],"dilation":[1,1],"dims":2},{"kind":"act","fn":"relu"},{"kind":"gap","dims":2},{"kind":"flatten"},{"kind":"linear","name":"6","in_features":6,"out_features":5}],"input_shape":null}',
        'cnn2d:3-4-6-5:relu', 18, 66, 'c3dfd0aaf403bb8d', '4c54174b7dc891a3'),
    'cnn2d-bn': (
        '{"layers":[{"kind":"conv2d","name":"0","in_features":2,"out_features":4,"kernel_size":[3,3],"stride":[1,1],"padding":[1,1],"dilation":[1,1],"dims":2},{"kind":"batchnorm","name":"1","in_features":4,"out_features":4,"dims":2},{"kind":"act","fn":"relu"},{"kind":"conv2d","name":"3","in_features":4,"out_features":6,"kernel_size":[5,5],"stride":[1,1],"padding":[2,2],"dilation":[1,1],"dims":2},{"kind":"batchnorm","name":"4","in_features":6,"out_features":6,"dims":2},{"kind":"act","fn":"relu"},{"kind":"gap","dims":2},{"kind":"flatten"},{"kind":"linear","name":"8","in_features":6,"out_features":5}],"input_shape":null}',
        'cnn2d:2-4-6-5:relu+bn', 17, 62, '793f2a2a6c244c6d', '02e1c2847ae6162e'),
    'cnn1d-bn': (
        '{"layers":[{"kind":"conv1d","name":"0","in_features":2,"out_features":4,"kernel_size":[5],"stride":[1],"padding":[2],"dilation":[1],"dims":1},{"kind":"batchnorm","name":"1","in_features":4,"out_features":4,"dims":1},{"kind":"act","fn":"relu"},{"kind":"conv1d","name":"3","in_features":4,"out_features":6,"kernel_size":[5],"stride":[1],"padding":[2],"dilation":[1],"dims":1},{"kind":"batchnorm","name":"4","in_features":6,"out_features":6,"dims":1},{"kind":"act","fn":"relu"},{"kind":"gap","dims":1},{"kind":"flatten"},{"kind":"linear","name":"8","in_features":6,"out_features":3}],"input_shape":null}',
        'cnn1d:2-4-6-3:relu+bn', 15, 50, 'e443d160654935ff', 'ef6e6eb492d21f71'),
}


def _digest(ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name,arch,shape", architectures(), ids=[a[0] for a in architectures()])
def test_sequential_architectures_unchanged(name, arch, shape):
    js, desc, nodes, edges, graph_digest, file_digest = PINNED[name]
    assert arch.to_json() == js
    assert arch.describe() == desc
    back = wsnets.Architecture.from_json(js)
    assert back == arch and hash(back) == hash(arch) and back.to_json() == js
    ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0))
    g = ws.to_graph()
    assert (g.num_nodes, g.edge_index.shape[1]) == (nodes, edges)
    assert _digest([g.x, g.edge_index, g.edge_attr, g.node_type, g.node_layer, g.node_pos, g.node_act, g.edge_type,
                    g.edge_layer]) == graph_digest
    raw = safetensors_bytes(ws.params, {ARCH_KEY: arch.to_json(), BATCH_KEY: "none"})
    assert hashlib.sha256(raw).hexdigest()[:16] == file_digest


def test_stored_shard_of_today_loads(tmp_path):
    """A file with today's bytes (architecture JSON in the metadata) loads to the same network."""
    name, arch, _ = architectures()[4]
    ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "old.safetensors"
    path.write_bytes(safetensors_bytes(ws.params, {ARCH_KEY: PINNED[name][0], BATCH_KEY: "none"}))
    back = wsnets.load(path)
    assert back.arch == arch and all(torch.equal(back.params[k], ws.params[k]) for k in ws.params)


def test_sequential_spec_unchanged():
    arch = architectures()[1][1]
    assert wsnets.permutation_spec(arch).rebasin() == {
        '0.weight': ('P1', None), '0.bias': ('P1',), '1.weight': ('P1',), '1.bias': ('P1',),
        '1.running_mean': ('P1',), '1.running_var': ('P1',), '3.weight': ('P2', 'P1'), '3.bias': ('P2',),
        '4.weight': ('P2',), '4.bias': ('P2',), '4.running_mean': ('P2',), '4.running_var': ('P2',),
        '6.weight': (None, 'P2'), '6.bias': (None,)}
    assert wsnets.permutation_spec(architectures()[3][1]).rebasin() == {
        '0.weight': ('P1', None, None, None), '0.bias': ('P1',), '2.weight': ('P2', 'P1', None, None),
        '2.bias': ('P2',), '6.weight': (None, 'P2'), '6.bias': (None,)}
