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


class InputTypeError(WSNetsError, TypeError):
    """An argument of a type wsnets cannot read (``wsnets.load(42)``); also a ``TypeError``."""


class TensorFormatError(CheckpointError):
    """A checkpoint entry that is not a dense real floating-point tensor under a string name (an integer
    key, a sparse, complex, integer or boolean tensor)."""


class MetadataError(CheckpointError):
    """A safetensors file's wsnets metadata (the architecture JSON) is not what wsnets writes."""


class CNNZooFormatError(CheckpointError):
    """A Small CNN Zoo directory whose ``layout.csv``, ``metrics.csv`` or ``weights.npy`` do not fit together."""


class RecipeError(ConfigError):
    """A zoo recipe value of the wrong type, sign or range, naming the recipe file and key."""


class OutputExistsError(ConfigError):
    """An output (a run directory, a zoo) that exists and would be overwritten or mixed with other work."""


class StoreError(CheckpointError):
    """A zoo directory that cannot be used as it is (see the subclasses)."""


class NotAZooError(StoreError):
    """An ``index.sqlite`` that is not a wsnets zoo index (empty, garbage, another application's database,
    corrupt). wsnets never writes to it."""


class ZooNotReadyError(StoreError):
    """A zoo whose build has not created its index yet."""


class DamagedZooError(StoreError):
    """A zoo whose committed rows point at missing or changed shards (deleted, truncated, overwritten)."""


class DiskFullError(WSNetsError):
    """No space left (or a file-size or quota limit) while writing; what was committed before is intact."""


class OutputError(WSNetsError):
    """An output that cannot be written (not enough disk space for it, a big-endian machine for safetensors)."""
