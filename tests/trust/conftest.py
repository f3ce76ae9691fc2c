"""The CLI contract for bad input, shared by the corpus tests: one line on stderr, exit code 2, no traceback,
every input byte for byte as it was."""

import hashlib
from pathlib import Path

import pytest

from wsnets.cli import main


def _hash_tree(d: Path) -> dict[str, str]:
    """Every file under ``d`` (but ``out/``) and its SHA-1: what a command must leave as it found it."""
    return {str(p.relative_to(d)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(d.rglob("*")) if "out" not in p.relative_to(d).parts and "__pycache__" not in p.parts}


@pytest.fixture
def hash_tree():
    return _hash_tree


@pytest.fixture
def contract_failures(capsys):
    """``check(commands)``: the commands (argument lists for ``wsnets``) that break the contract, each with
    its exit code and stderr."""
    def check(cmds: list[list[str]]) -> list[str]:
        failures = []
        for argv in cmds:
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: a mistake in the test's command lines
                code = f"SystemExit({e.code})"
            except Exception as e:  # noqa: BLE001 - an exception out of main() is a traceback for a user
                code = f"raised {type(e).__name__}: {e}"
            out, err = capsys.readouterr()
            lines = [v for v in (line.split("\r")[-1] for line in err.split("\n")) if v.strip()]  # as a terminal shows
            if code != 2 or len(lines) != 1 or "Traceback" in err or not lines[0].startswith("wsnets "):
                failures.append(f"{' '.join(argv)[-200:]} -> exit {code}: {err.strip()[-300:]!r}")
        return failures
    return check
