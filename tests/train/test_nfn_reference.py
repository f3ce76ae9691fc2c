"""The reference nfn HNP encoder: invariant to hidden permutations, sensitive to input permutations."""

import pytest
import torch

import wsnets
from wsnets.errors import ArchitectureMismatchError
from wsnets.testing import assert_invariant, assert_sensitive_to_inputs
from wsnets.train.meta_model import build_encoder

pytest.importorskip("nfn")


def test_nfn_hnp_symmetry_and_shape():
    nets = wsnets.WeightSpace.random(wsnets.mlp(6, [8, 5], 3, batchnorm=True), 4)
    enc = build_encoder({"name": "nfn-hnp", "hidden": 4, "out_dim": 7}, nets)
    assert enc(nets).shape == (4, 7)
    assert_invariant(enc, nets, represent=lambda x: x)
    assert_sensitive_to_inputs(enc, nets, represent=lambda x: x)
    with pytest.raises(ArchitectureMismatchError, match="nfn-hnp was built for"):
        enc(wsnets.WeightSpace.random(wsnets.mlp(6, [9, 5], 3), 2))
