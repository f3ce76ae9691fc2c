"""Checking a zoo: every committed group's shard is there, whole and unchanged; the zoo is one plan.

A group's shard size and SHA-256 are recorded when it commits (``groups.bytes``/``groups.sha256``);
:func:`check_shard` compares them (groups committed by older versions, without a checksum, get a
structural check: the safetensors header parses, the file is as long as the header says, and it holds
the tensors of every checkpoint the group's rows point at). Used by a resumed build (damaged groups are
retrained), ``zoo merge`` (damaged parts are refused) and ``wsnets zoo info --verify``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    from ..io import sha256_file
    return sha256_file(path)


def header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the file size it implies; ``ValueError`` if it does not parse."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise ValueError("header length out of range")
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError("truncated header")
    h = json.loads(raw)
    if not isinstance(h, dict):
        raise ValueError("header is not a JSON object")
    end = max((int(v["data_offsets"][1]) for k, v in h.items() if k != "__metadata__"), default=0)
    return h, 8 + n + end


def check_shard(root: Path, group: Mapping[str, Any], keys: Iterable[str] = ()) -> str | None:
    """Why the shard of a committed ``group`` (a groups-table row) is unusable, or None if it is fine.

    ``keys``: the checkpoint keys (``e0015``) its rows read, checked when no checksum was recorded."""
    path = root / str(group["shard"])
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    want_bytes, want_sha = group.get("bytes"), group.get("sha256")
    if want_bytes is not None and size != int(want_bytes):
        return f"{size} bytes, {int(want_bytes)} at commit (truncated or overwritten)"
    if want_sha:
        try:
            got = file_digest(path)
        except OSError as e:
            return f"unreadable ({e.strerror})"
        return None if got == want_sha else "contents changed since commit (SHA-256 differs)"
    try:  # a group committed before checksums were recorded
        h, expect = header(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"not a readable safetensors file ({e})"
    if size != expect:
        return f"{size} bytes, its header needs {expect} (truncated or overwritten)"
    names = {k.split("/", 1)[0] for k in h if k != "__metadata__"}
    lost = sorted(set(keys) - names)
    return f"no tensors under {lost[0]!r}" if lost else None


def check_rows(root: Path, group: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
               archs: dict[str, Any] | None = None) -> str | None:
    """Why some of a group's ``rows`` cannot be loaded from its (intact) shard, or None: each row names the
    group's shard, a key with tensors in it, a position within them, and an architecture (JSON) whose
    parameter shapes are the tensors' shapes. ``archs`` caches parsed architectures across groups."""
    from ..arch import Architecture
    from ..errors import WSNetsError
    archs = {} if archs is None else archs
    try:
        h, _ = header(root / str(group["shard"]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"not a readable safetensors file ({e})"
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in h.items():
        if name != "__metadata__" and "/" in name and isinstance(info, dict):
            k, _, t = name.partition("/")
            shapes.setdefault(k, {})[t] = tuple(info.get("shape") or ())
    for r in rows:
        who = f"row {r.get('model_id')} epoch {r.get('epoch')}"
        if r.get("shard") != group["shard"]:
            return f"{who} points at shard {r.get('shard')!r}, its group's is {group['shard']!r}"
        got = shapes.get(str(r.get("key")))
        if not got:
            return f"{who}: no tensors under {r.get('key')!r}"
        idx = r.get("idx")
        n = min(s[0] if s else 0 for s in got.values())
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n:
            return f"{who}: position {idx!r} is not one of the {n} checkpoints under {r.get('key')!r}"
        text = r.get("arch")
        if text not in archs:
            try:
                archs[text] = Architecture.from_json(text).param_shapes if isinstance(text, str) else None
            except (WSNetsError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
                archs[text] = None
        want = archs[text]
        if want is None:
            return f"{who}: its architecture column is not an architecture"
        bad = next((k for k, v in want.items() if got.get(k, ())[1:] != tuple(v)), None)
        if bad is not None:
            return (f"{who}: tensor {bad!r} has shape {list(got.get(bad, ())[1:]) or 'none'} in the shard, its "
                    f"architecture needs {list(want[bad])}")
    return None


def verify(root: Path, groups: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every group's shard checked (:func:`check_shard`) and every row matched to a committed group.

    Returns ``{"groups": n, "checked_bytes": b, "damaged": [{group_id, shard, problem, rows}],
    "orphan_rows": k, "ok": bool}``."""
    keys: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    members: dict[str, list[Mapping[str, Any]]] = {}
    orphans = 0
    known = {g["group_id"] for g in groups}
    for r in rows:
        g = r.get("group_id")
        if g not in known:
            orphans += 1
            continue
        keys.setdefault(g, set()).add(str(r.get("key")))
        count[g] = count.get(g, 0) + 1
        members.setdefault(g, []).append(r)
    damaged, checked, structural = [], 0, 0
    archs: dict[str, Any] = {}
    for g in groups:
        problem = check_shard(root, g, keys.get(g["group_id"], ()))
        if not problem and members.get(g["group_id"]):
            problem = check_rows(root, g, members[g["group_id"]], archs)
        if problem:
            damaged.append({"group_id": g["group_id"], "shard": g["shard"], "problem": problem,
                            "rows": count.get(g["group_id"], 0)})
        elif g.get("sha256"):
            checked += int(g.get("bytes") or 0)
        else:
            structural += 1
    return {"groups": len(groups), "checked_bytes": checked, "without_checksum": structural, "damaged": damaged,
            "orphan_rows": orphans, "ok": not damaged and not orphans}


def describe_damage(root: Path, damaged: Sequence[Mapping[str, Any]], most: int = 3) -> str:
    parts = [f"{d['shard']} {d['problem']}" for d in damaged[:most]]
    more = f" and {len(damaged) - most} more" if len(damaged) > most else ""
    return f"{len(damaged)} damaged shard(s) in {root}: " + "; ".join(parts) + more


def plan_status(meta: Mapping[str, str], committed: Iterable[str]) -> dict[str, Any]:
    """How the committed groups compare with the plan the zoo was built for (recipe, ``--limit``,
    ``--shard``, recorded in the meta table): ``state`` is ``complete``, ``partial`` (groups left to
    build: an interrupted build, resumed by running it again), ``mixed`` (groups of another plan) or
    ``unknown`` (no recipe or plan recorded)."""
    from ..errors import WSNetsError
    from .build import parse_shard, plan
    from .recipe import parse_recipe
    committed = set(committed)
    out: dict[str, Any] = {"state": "unknown", "committed_groups": len(committed)}
    raw = meta.get("recipe_json") or ""
    toml_text = meta.get("recipe_toml") or ""
    try:
        if raw:
            recipe = parse_recipe(json.loads(raw), "the zoo's recipe")
        elif toml_text:
            import tomllib
            recipe = parse_recipe(tomllib.loads(toml_text), "the zoo's recipe")
        else:
            return out
    except Exception:  # noqa: BLE001 - a recipe this version cannot parse: the plan is unknown, not an error
        return out
    recorded = "limit" in meta or "shard" in meta
    try:
        limit = int(meta["limit"]) if meta.get("limit") not in (None, "", "none") else None
        parts = [parse_shard(s) for s in (meta.get("shard") or "0/1").split(",")]
    except (ValueError, WSNetsError):  # a plan this version cannot read: unknown, as an unparsable recipe
        return out
    full = plan(recipe, limit)
    want = {g.group_id for i, g in enumerate(full) if any(i % n == k for k, n in parts)}
    foreign = committed - want
    out.update({"limit": limit, "shard": ",".join(f"{k}/{n}" for k, n in parts), "planned_groups": len(want),
                "missing_groups": len(want - committed), "foreign_groups": len(foreign),
                "planned_models": sum(len(g.runs) for i, g in enumerate(full) if any(i % n == k for k, n in parts)),
                "recorded": recorded})
    if foreign:
        out["state"] = "mixed" if recorded else "unknown"
    else:
        out["state"] = "partial" if want - committed else "complete"
    return out
