"""The ``wsnets`` command line.

Each command lives in its own module exposing ``register(subparsers)``; this file only dispatches,
importing just the module of the command that runs (start-up stays fast). Every command takes
``--json`` where it prints results; bad input becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError, WSNetsError

# command -> (module with register(subparsers), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("wsnets.run", "the main job: build the default zoo, train meta-models and baselines, write report/"),
    "graph": ("wsnets.cli", "show a checkpoint's layers and neural-graph size"),
    "zoo": ("wsnets.zoo.cli", "build, inspect and merge model zoos"),
    "train": ("wsnets.train.cli", "train a meta-model on a zoo"),
    "predict": ("wsnets.train.cli", "predict properties of checkpoints with a trained meta-model"),
    "esd": ("wsnets.esd.cli", "heavy-tailed spectral analysis of a checkpoint (WeightWatcher metrics)"),
    "merge": ("wsnets.merge.cli", "merge any checkpoint (linear, SLERP, TIES, DARE, ...), soups, alignment, barriers"),
    "landscape": ("wsnets.landscape.cli", "loss surfaces, Hessian spectra, intrinsic dimension"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """An argument mistake is one line (``wsnets train: error: argument --seeds: invalid int value: 'a'``) and
    exit code 2, as every other bad input; ``--help`` shows the usage."""

    def error(self, message: str):
        name = getattr(self, "name", None) or self.prog  # the top-level parser names the command it was given
        print(f"{name}: error: {_one_line(message)} (see {name} --help)", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``lo`` (a count, a size, a number of steps)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite number (no nan, inf)."""
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


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


def add_arch_options(p: argparse.ArgumentParser) -> None:
    """``--module``/``--arch``: how a user gives the architecture of a bare checkpoint."""
    p.add_argument("--module", metavar="FILE.py:CLASS", default=None,
                   help="architecture of bare checkpoints: a Python file defining an nn.Module class, built with "
                        "no arguments or FILE.py:CLASS(arg=...) with literal keyword arguments; an importable "
                        "module works too (wsnets.models:Bert for the MiniLM checkpoint)")
    p.add_argument("--arch", metavar="ARCH.json", default=None,
                   help="architecture of bare checkpoints as JSON (wsnets Architecture.to_json())")


def load_checkpoint(path: str, args: argparse.Namespace | None, **kwargs: Any):
    """``wsnets.load`` with the ``--module``/``--arch``/``--activation`` options of a command (the given
    architecture is built once per command, however many checkpoints it reads)."""
    from .io import load, resolve_arch
    if args is None:
        return load(path, **kwargs)
    arch = getattr(args, "_resolved_arch", None)
    if arch is None and (getattr(args, "module", None) or getattr(args, "arch", None)):
        arch = args._resolved_arch = resolve_arch(args.module, args.arch)
    return load(path, arch=arch, **({"activation": args.activation} if getattr(args, "activation", None) else {}),
                **kwargs)


def note(args: argparse.Namespace, msg: str) -> None:
    """A one-line remark on stderr that does not stop the command (a cast to another precision, say)."""
    sub = {"zoo": "zoo_command", "merge": "method", "landscape": "landscape_command"}.get(getattr(args, "command", ""))
    name = " ".join(str(v) for v in (getattr(args, "command", None), getattr(args, sub, None) if sub else None) if v)
    print(f"wsnets {name}: note: {msg}", file=sys.stderr)


def emit(args: argparse.Namespace, obj: Any, text: str | Callable[[], str]) -> None:
    """Print ``obj`` as JSON with ``--json``, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text() if callable(text) else text)


class PlotTarget:
    """Where ``--plot ARG`` puts a command's plots; one meaning in every command.

    ``ARG`` ending in ``.png`` (and not an existing folder) is a file: the command's main plot is written
    there and any other plot beside it as ``<stem>_<name>.png``. Anything else is a folder (created) that
    receives every plot under its own name. Another image suffix (``.pdf``, ``.svg``, ``.jpg``) is refused
    rather than taken for a folder name.
    """

    def __init__(self, arg: str | os.PathLike) -> None:
        p = Path(arg)
        suffix = p.suffix.lower()
        if suffix in (".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".tif", ".tiff", ".gif", ".webp") and not p.is_dir():
            raise ConfigError(f"--plot {arg}: plots are written as PNG: give a .png file or a folder")
        self.file = p if suffix == ".png" and not p.is_dir() else None
        self.dir = p.parent if self.file is not None else p
        self.prefix = f"{p.stem}_" if self.file is not None else ""

    def path(self, name: str, main: bool = False) -> Path:
        """The file for the plot ``name`` (e.g. ``"alpha_per_layer.png"``); ``main``: the command's main plot."""
        if self.file is not None and main:
            return self.file
        return self.dir / f"{self.prefix}{name}"


# -- wsnets graph --------------------------------------------------------------------------------
def _graph(args: argparse.Namespace) -> int:
    from .graph import graph_summary
    ws = load_checkpoint(args.path, args, allow_nonfinite=args.allow_nonfinite)
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
    add_arch_options(p)
    add_common(p, device=False)


# -- entry point ---------------------------------------------------------------------------------
def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsnets", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Neural-network weights as data.\n\ncommands:\n" +
        "\n".join(f"  {k:<10} {h}" for k, (_, h) in COMMANDS.items()))
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(sub)
        parser.name = f"wsnets {command}"
    return parser


def _version() -> str:
    from . import __version__
    return f"wsnets {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input is one line on stderr and exit code 2, never a traceback.

    Exit codes: 0 success, 2 bad input or a failed check (a :class:`WSNetsError`, a file that cannot be
    read or written, a full disk), 130 Ctrl-C, 141 output pipe closed by its reader (``| head``: quietly,
    as a program killed by SIGPIPE), 1 an internal error (a bug: ``WSNETS_DEBUG=1`` shows its traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    from .memory import tame_allocator
    tame_allocator()  # freed batch tensors go back to the system (see wsnets.memory): the main job stays < 2 GB
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as e:
        print(f"wsnets: error: command {command!r} is not available in this build ({e})", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a mistake in the arguments, already reported (2)
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    sub = {"zoo": "zoo_command", "merge": "method", "landscape": "landscape_command"}.get(args.command)
    name = " ".join(str(v) for v in (args.command, getattr(args, sub, None) if sub else None) if v)
    import warnings
    warnings.formatwarning = lambda message, *a, **k: f"wsnets {name}: warning: {message}\n"
    try:
        if isinstance(getattr(args, "device", None), str):  # --device cuda on a machine without: one line, now
            from .esd.eigen import check_device
            check_device(args.device)
        for opt in ("out", "plot", "cache"):  # an output under a file: refused now, not after the work
            if isinstance(getattr(args, opt, None), (str, os.PathLike)):
                from .io import check_output_path
                check_output_path(getattr(args, opt), f"--{opt}")
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _pipe_closed()
    except WSNetsError as e:
        return _fail(name, str(e))
    except OSError as e:
        return _fail(name, _os_error_line(e))
    except KeyboardInterrupt:
        print(f"wsnets {name}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        return _fail(name, "out of memory (try a smaller batch, --limit, or a machine with more memory)", code=1)
    except Exception as e:  # noqa: BLE001 - the CLI never prints a traceback; a bug is reported as one
        if os.environ.get("WSNETS_DEBUG"):
            raise
        return _fail(name, f"internal error, a bug in wsnets ({type(e).__name__}: {_one_line(str(e))}); "
                           "WSNETS_DEBUG=1 prints the traceback", code=1)


def _one_line(msg: str) -> str:
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip())


def _fail(name: str, msg: str, code: int = 2) -> int:
    try:
        print(f"wsnets {name}: error: {_one_line(msg)}", file=sys.stderr)
    except (BrokenPipeError, OSError):
        pass
    return code


def _os_error_line(e: OSError) -> str:
    """One line for a file the command could not read or write (or a full disk)."""
    from .io import is_disk_full
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    if is_disk_full(e):
        return f"{where}no space left ({e.strerror or e}); free space and rerun the same command"
    if isinstance(e, FileNotFoundError):
        return f"{where or str(e) + ': '}no such file or directory"
    return f"{where}{e.strerror or e}"


def _pipe_closed() -> int:
    """The reader of our output went away (``wsnets esd --json | head``): stop quietly. Standard output is
    pointed at /dev/null so that the interpreter's final flush does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file (tests)
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
