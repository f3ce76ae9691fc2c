"""A zoo-build worker process: forked by :func:`wsnets.zoo.build.build` with ``workers > 1`` (Linux),
or started as ``python -m wsnets.zoo.worker READ_FD WRITE_FD`` (elsewhere). A spawned worker first
reads ``(recipe, limit, bases file)`` and plans the recipe itself (the plan is a pure function of
``(recipe, limit)``); a forked one has the parent's plan. Either reads ``(index, plan position, group id)``
tasks from ``READ_FD``, trains
each group with one torch thread and writes ``(index, [(epoch, params, metrics), ...], seconds,
error)`` back (NumPy arrays, length-prefixed pickles over a private pipe: the parent is the only
peer). It exits when ``READ_FD`` closes.
Groups are not committed here: the parent is the store's only writer.
"""

from __future__ import annotations

import os
import sys


def main(read_fd: int, write_fd: int) -> int:
    """A spawned worker: reads the recipe, ``limit`` and the bases file from ``read_fd``, then serves."""
    from ..io import read_safetensors
    from .build import plan, recv_msg
    try:
        recipe, limit, bases_path = recv_msg(read_fd, "")
    except EOFError:
        return 0
    bases = None if bases_path is None else read_safetensors(bases_path)[0]
    return serve(read_fd, write_fd, recipe, plan(recipe, limit), bases)  # the parent's plan: a pure function


def serve(read_fd: int, write_fd: int, recipe, groups, bases) -> int:
    """Train the groups of the plan ``groups`` named on ``read_fd`` (one torch thread) until it closes;
    results to ``write_fd``. Spawned workers come here from :func:`main`, forked ones directly (they
    have the recipe and the plan)."""
    import torch

    from .build import _Banks, checkpoints_to_numpy, recv_msg, send_msg, train_one
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    banks = _Banks(dev)
    while True:
        try:
            i, j, group_id = recv_msg(read_fd, "")
        except EOFError:
            return 0
        try:
            g = groups[j]
            if g.group_id != group_id:
                raise RuntimeError(f"zoo worker planned group {g.group_id} where the build has {group_id}")
            cks, seconds = train_one(recipe, g, banks.of(g), dev, bases)
            msg = (i, checkpoints_to_numpy(cks), seconds, None)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            msg = (i, None, None, e)
        try:
            send_msg(write_fd, msg)
        except OSError:  # the parent is gone
            return 0


if __name__ == "__main__":
    code = main(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown (~0.4 s with torch loaded): the build waits for it
