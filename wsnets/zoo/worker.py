"""A zoo-build worker process: ``python -m wsnets.zoo.worker READ_FD WRITE_FD``.

Started by :func:`wsnets.zoo.build.build` with ``workers > 1``. It reads ``(recipe, limit, bases
file)`` and plans the recipe itself (the plan is a pure function of both), then reads ``(index,
plan position, group id)`` tasks from ``READ_FD``, trains each group with one torch thread and writes
``(index, [(epoch, params, metrics), ...], seconds, error)`` back (NumPy arrays, length-prefixed
pickles over a private pipe: the parent is the only peer). It exits when ``READ_FD`` closes.
Groups are not committed here: the parent is the store's only writer.
"""

from __future__ import annotations

import sys


def main(read_fd: int, write_fd: int) -> int:
    import torch

    from ..io import read_safetensors
    from .build import _Banks, checkpoints_to_numpy, plan, recv_msg, send_msg, train_one
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    banks = _Banks(dev)
    try:
        recipe, limit, bases_path = recv_msg(read_fd, "")
    except EOFError:
        return 0
    groups = plan(recipe, limit)  # the parent's plan: a pure function of (recipe, limit)
    bases = None if bases_path is None else read_safetensors(bases_path)[0]
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
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
