"""Run logging: console lines, a JSON-lines file, and wandb only when asked.

wandb is used when ``enabled=True`` (``--wandb`` / ``log.wandb = true``) or when the ``WANDB_MODE``
environment variable is ``online`` or ``offline``; ``WANDB_MODE=disabled`` or unset means no wandb.
Offline mode needs no network (runs are written under ``RUN/wandb``). Only rank 0 of a distributed
run logs; other ranks get a silent logger.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping


def wandb_mode(enabled: bool) -> str | None:
    """The wandb mode to use (``"online"``/``"offline"``) or None for no wandb."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return None
    if env in ("online", "offline", "run", "dryrun"):
        return "offline" if env in ("offline", "dryrun") else "online"
    return "online" if enabled else None


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class RunLogger:
    """Writes each event to ``jsonl_path`` (one JSON object per line) and optionally the console and wandb.

    Parameters
    ----------
    jsonl_path : file to append to, or None.
    console : print ``event`` lines to stderr.
    wandb : use wandb if :func:`wandb_mode` allows it.
    config : run config recorded with wandb.
    active : False makes every method a no-op (non-zero ranks).
    """

    def __init__(self, jsonl_path: str | Path | None = None, *, console: bool = True, wandb: bool = False,
                 project: str = "wsnets", name: str | None = None, config: Mapping | None = None,
                 wandb_dir: str | Path | None = None, active: bool = True) -> None:
        self.active = active
        self.console = console and active
        self.path = Path(jsonl_path) if (jsonl_path and active) else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = None
        mode = wandb_mode(wandb) if active else None
        if mode:
            import wandb as _wandb
            kw = {"dir": str(wandb_dir)} if wandb_dir else {}
            if wandb_dir:
                Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            self._wandb = _wandb.init(project=project, name=name, config=dict(config or {}), mode=mode,
                                      reinit=True, **kw)
        self._t0 = time.time()

    @property
    def wandb_run(self):
        return self._wandb

    def log(self, event: str, step: int | None = None, **values: Any) -> None:
        """Record one event (``"epoch"``, ``"test"``, ...) with scalar or nested values."""
        if not self.active:
            return
        rec = {"event": event, "time_s": round(time.time() - self._t0, 3)}
        if step is not None:
            rec["step"] = step
        rec.update(_clean(values))
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        if self._wandb is not None:
            flat = {f"{event}/{k}": v for k, v in _flatten(values).items() if isinstance(v, (int, float))}
            self._wandb.log(flat, step=step)

    def info(self, text: str) -> None:
        """A human line on the console (through tqdm so progress bars stay intact)."""
        if not self.console:
            return
        try:
            from tqdm import tqdm
            tqdm.write(text, file=sys.stderr)
        except ImportError:  # pragma: no cover
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
