"""Meta-networks that read weights: equivariant encoders, baselines and heads.

Every encoder is an ``nn.Module`` with ``forward(batch) -> [B, out_dim]``, an ``out_dim`` attribute
and a ``representation`` saying what it reads (:func:`represent` builds it from networks):

==========================  ================  ==============================================
encoder                     representation    input
==========================  ================  ==============================================
NeuralGraphEncoder          ``graph``         ``wsnets.to_batch(networks)`` (any architectures)
NeuralGraphTransformer      ``graph``         same
NPEncoder, HNPEncoder       ``tensors``       a batched WeightSpace of one architecture
FlatMLP                     ``flat``          ``[B, num_params]`` (one architecture)
StatFeatures (StatNN)       ``stats``         ``[B, 14 L]`` weight statistics
ESDFeatures                 ``esd``           ``[B, F]`` from ``wsnets.esd.esd_features``
==========================  ================  ==============================================

Heads (:class:`RegressionHead`, :class:`ClassificationHead`) are separate modules;
:func:`build_encoder`/:func:`build_head` build any of them from a config dict.
"""

from .baselines import ESDFeatures, FeatureMLP, FlatMLP, StatFeatures, StatGBM
from .equivariant import (DWSBlock, HNPEncoder, HNPLinear, NPEncoder, NPLinear, WeightSpaceEncoder,
                          WeightSpaceLinear, WeightSpacePool, WSFeatures)
from .graph_encoder import EdgePNALayer, GraphFeaturizer, NeuralGraphEncoder
from .heads import ClassificationHead, RegressionHead
from .registry import ENCODERS, HEADS, build_encoder, build_gbm, build_head, represent
from .transformer import NeuralGraphTransformer, RelationalAttentionLayer

__all__ = [
    "NeuralGraphEncoder", "NeuralGraphTransformer", "GraphFeaturizer", "EdgePNALayer", "RelationalAttentionLayer",
    "WSFeatures", "WeightSpaceLinear", "NPLinear", "HNPLinear", "DWSBlock", "WeightSpacePool", "WeightSpaceEncoder",
    "NPEncoder", "HNPEncoder", "FeatureMLP", "StatFeatures", "StatGBM", "FlatMLP", "ESDFeatures",
    "RegressionHead", "ClassificationHead", "ENCODERS", "HEADS", "build_encoder", "build_head", "build_gbm",
    "represent",
]
