"""The ``wsnets`` command line.

Each command lives in its own module exposing ``register(subparsers)``; this file only dispatches,
importing just the module of the command that runs (start-up stays fast). Every command takes
``--json`` where it prints results; bad input becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable, Sequence

from .errors import WSNetsError

# command -> (module with register(subparsers), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("wsnets.run", "the main job: build the default zoo, train meta-models and baselines, write report/"),
    "graph": ("wsnets.cli", "show a checkpoint's layers and neural-graph size"),
    "zoo": ("wsnets.zoo.cli", "build, inspect and merge model zoos"),
    "train": ("wsnets.train.cli", "train a meta-model on a zoo"),
    "predict": ("wsnets.train.cli", "predict properties of checkpoints with a trained meta-model"),
    "esd": ("wsnets.esd.cli", "heavy-tailed spectral analysis of a checkpoint (WeightWatcher metrics)"),
    "merge": ("wsnets.merge.cli", "average, soup, task arithmetic, TIES, permutation alignment, barriers"),
    "landscape": ("wsnets.landscape.cli", "loss surfaces, Hessian spectra, intrinsic dimension"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def add_parser(sub, name: str, help: str, example: str, func: Callable[[argparse.Namespace], Any]) -> argparse.ArgumentParser:
    """A sub-command parser with the shared conventions: example in --help, --json, --device."""
    p = sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}", formatter_class=_Formatter)
    p.set_defaults(func=func)
    return p


def add_common(p: argparse.ArgumentParser, *, json_flag: bool = True, device: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    if device:
        p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")


def emit(args: argparse.Namespace, obj: Any, text: str | Callable[[], str]) -> None:
    """Print ``obj`` as JSON with ``--json``, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text() if callable(text) else text)


# -- wsnets graph --------------------------------------------------------------------------------
def _graph(args: argparse.Namespace) -> int:
    from .graph import graph_summary
    from .io import load
    ws = load(args.path, activation=args.activation, allow_nonfinite=args.allow_nonfinite)
    s = graph_summary(ws)
    s["path"] = args.path

    def text() -> str:
        lines = [f"{args.path}: {s['architecture']}",
                 f"  neurons per layer: {' -> '.join(map(str, s['groups']))}",
                 f"  nodes: {s['nodes']:,}   edges: {s['edges']:,}   edge features: {s['edge_dim']}   "
                 f"parameters: {s['parameters']:,}",
                 "  layers:"] + [f"    {l}" for l in s["layers"]]
        return "\n".join(lines)
    emit(args, s, text)
    return 0


def register(sub) -> None:
    p = add_parser(sub, "graph", COMMANDS["graph"][1], "wsnets graph model.safetensors --json", _graph)
    p.add_argument("path", help="checkpoint: .safetensors, .pt or .pth")
    p.add_argument("--activation", default="relu", help="activation assumed for a bare state_dict")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights")
    add_common(p, device=False)


# -- entry point ---------------------------------------------------------------------------------
def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsnets", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Neural-network weights as data.\n\ncommands:\n" +
        "\n".join(f"  {k:<10} {h}" for k, (_, h) in COMMANDS.items()))
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(sub)
    return parser


def _version() -> str:
    from . import __version__
    return f"wsnets {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as e:
        print(f"wsnets: error: command {command!r} is not available in this build ({e})", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except WSNetsError as e:
        print(f"wsnets {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"wsnets {args.command}: error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wsnets {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
