"""Recipes and meta-model configs shipped with wsnets, addressed by name or by path.

The repository's ``zoo/*.toml`` (zoo recipes) and ``train/*.toml`` (meta-model configs) are the source; a
wheel carries copies inside the package (``wsnets/recipes``, ``wsnets/configs``: see ``setup.py``), so an
installed wsnets finds them as a source checkout does:

>>> from wsnets.resources import find, names
>>> find("recipe", "digits-mlp").name, "graph" in names("config")
('digits-mlp.toml', True)

A name is tried as a path first (``zoo/digits-mlp.toml``, ``./my.toml``), then in the package, then in
the source tree beside the package.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

#: kind -> (folder inside the installed package, folder of the source tree)
KINDS = {"recipe": ("recipes", "zoo"), "config": ("configs", "train")}


def _dirs(kind: str) -> list[Path]:
    if kind not in KINDS:
        raise ConfigError(f"unknown resource kind {kind!r} (use {', '.join(KINDS)})")
    inside, source = KINDS[kind]
    pkg = Path(__file__).resolve().parent
    return [d for d in (pkg / inside, pkg.parent / source) if d.is_dir()]


def names(kind: str) -> list[str]:
    """The names of the shipped recipes (``kind="recipe"``) or configs (``kind="config"``)."""
    return sorted({p.stem for d in _dirs(kind) for p in d.glob("*.toml")})


def find(kind: str, name: str | Path) -> Path:
    """The file of a recipe or config given by path or by name (``"digits-mlp"``, ``"graph"``); a name
    that is neither is a one-line :class:`ConfigError` listing the shipped ones."""
    if not isinstance(name, (str, Path)):
        from .errors import InputTypeError
        raise InputTypeError(f"a {kind} is given by name or path, not a {type(name).__name__} ({name!r})")
    p = Path(name)
    if p.is_file():
        return p
    source = KINDS.get(kind, ("", ""))[1]
    if p.suffix in ("", ".toml") and str(p.parent) in (".", source):  # "graph", "graph.toml", "train/graph.toml"
        for d in _dirs(kind):
            q = d / f"{p.stem}.toml"
            if q.is_file():
                return q
    shipped = f"the shipped {kind}s: {', '.join(names(kind)) or 'none found'}"
    if str(p.parent) not in (".", source):
        raise ConfigError(f"{p}: no such {kind} file ({shipped})")
    raise ConfigError(f"no such {kind} {str(name)!r}: not a file, nor one of {shipped}")
