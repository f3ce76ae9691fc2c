"""Heavy-tailed self-regularization: empirical spectral densities (ESD) of weight matrices.

WeightWatcher-compatible per-layer metrics (Martin & Mahoney 2019, 2021), batched in torch on CPU
or GPU with float64 fits. See :func:`analyze` for checkpoints and :func:`esd_features` for zoos.
"""

from .analyze import analyze, summary
from .eigen import layer_spectrum, layout, matrix_eigenvalues
from .features import esd_feature_names, esd_features
from .metrics import fit_mp
from .powerlaw import PowerLawFit, fit_powerlaw

__all__ = ["analyze", "summary", "esd_features", "esd_feature_names", "fit_powerlaw", "PowerLawFit", "fit_mp",
           "layer_spectrum", "layout", "matrix_eigenvalues"]
