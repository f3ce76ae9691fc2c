"""Exception classes. Each says what went wrong; the CLI turns any of them into one line and exit code 2."""

from __future__ import annotations


class WSNetsError(Exception):
    """Base class of every error wsnets raises on bad input."""


class CheckpointError(WSNetsError):
    """A checkpoint file is missing, empty, truncated or corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code on load (refused; its code never runs)."""


class NonFiniteWeightsError(WSNetsError):
    """NaN or Inf in a weight tensor."""


class UnsupportedLayerError(WSNetsError):
    """A layer kind wsnets cannot represent, e.g. ``LSTM at 'rnn'``."""


class SpatialFlattenError(UnsupportedLayerError):
    """A flatten over spatial positions of a convolution's output (no neuron-level graph exists)."""


class ShapeMismatchError(WSNetsError):
    """Two consecutive layers whose shapes do not chain, or a tensor of the wrong shape."""


class MissingKeyError(WSNetsError, KeyError):
    """A parameter, column or config key that should be there is not."""

    def __str__(self) -> str:  # KeyError quotes its message; we want the plain line
        return str(self.args[0]) if self.args else ""


class ArchitectureMismatchError(WSNetsError):
    """Models that must share an architecture (merging, stacking) do not."""


class ConfigError(WSNetsError):
    """A bad configuration value, unknown key or wrong type."""
