"""The main job's report: one results table (Markdown + JSON) and the plots that go with it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_json, atomic_write_text

REGRESSION = ("test_acc", "gen_gap")
TARGET_LABEL = {"test_acc": "test accuracy", "gen_gap": "generalization gap (train − test accuracy)"}


def _label(m: str) -> str:
    from .run import LABELS
    return LABELS.get(m, m)


def _cell(ms: dict | None, digits: int = 3) -> str:
    if not ms or ms.get("n", 1) == 0 or ms.get("mean") is None or math.isnan(ms["mean"]):
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}" if ms.get("n", 1) > 1 else f"{ms['mean']:.{digits}f}"


def results_table(res: dict) -> str:
    """Markdown: one row per method; Kendall τ and R² per regression target, then time."""
    t = res["timings"]
    lines = ["| method | τ test acc | R² test acc | τ gen. gap | R² gen. gap | test models | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        test = r["test"]
        cells = [_cell(test.get(tg, {}).get(k)) for tg in REGRESSION for k in ("kendall_tau", "r2")]
        n_test = r.get("sizes", {}).get("test", r.get("alpha", {}).get("valid", ""))
        name = _label(m) + (f" † (only {n_test} test models)" if r.get("only_architecture") else "") + \
            (" ‡" if r.get("slope") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {n_test} | {t.get(m, float('nan')):.0f} |")
    out = "\n".join(lines)
    for m, r in res["methods"].items():
        if r.get("error"):
            out += f"\n\n{_label(m)}: not trained: {r['error']}"
    only = {r["only_architecture"] for r in res["methods"].values() if r.get("only_architecture")}
    if only:
        out += (f"\n\n† fixed-architecture encoder: trained and tested only on the zoo's most common architecture "
                f"({', '.join(sorted(only))}), so its test set is a small subset of the others': its τ on so few "
                "models is too noisy to compare with the rows above.")
    for m, r in res["methods"].items():
        if r.get("slope"):
            out += "\n\n‡ " + alpha_note(r)
    if res.get("regions"):
        out += "\n\n| region zoo | dataset accuracy | dataset macro-F1 | task accuracy | time (s) |\n|---|---|---|---|---|\n"
        for m, r in res["regions"].items():
            d, k = r["test"].get("dataset", {}), r["test"].get("task", {})
            out += (f"| {_label(m)} | {_cell(d.get('accuracy'))} | {_cell(d.get('macro_f1'))} | "
                    f"{_cell(k.get('accuracy'))} | {t.get('regions:' + m, float('nan')):.0f} |\n")
        for m, r in res["regions"].items():
            if r.get("error"):
                out += f"\n{_label(m)} (region zoo): not trained: {r['error']}\n"
    zoo_t = ", ".join(f"{k[4:]} {v:.0f} s" for k, v in t.items() if k.startswith("zoo:"))
    out += f"\n\nZoo building: {zoo_t}. Total: {t.get('total', float('nan')):.0f} s."
    return out


def write_report(res: dict, out: str | Path) -> None:
    """``out/results.md``, ``out/results.json`` and the plots (each plot failure is reported, not fatal)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name, fn in (("predicted_vs_true.png", _plot_predictions), ("esd_alpha_vs_test_acc.png", _plot_alpha),
                     ("embeddings_regions.png", _plot_embeddings)):
        try:
            if fn(res, out / name):
                plots[name] = str(out / name)
        except Exception as e:  # a plot must never lose the table
            plots[name] = f"not drawn: {type(e).__name__}: {e}"
    res["plots"] = plots
    summary = {k: v for k, v in res.items() if k != "methods"}
    summary["methods"] = {m: {k: r[k] for k in ("test", "sizes", "only_architecture", "error") if k in r}
                          for m, r in res["methods"].items()}
    summary["regions"] = {m: {"test": {t: {k: v for k, v in ms.items() if k != "confusion"} for t, ms in r["test"].items()
                                       if isinstance(ms, dict)}} for m, r in res.get("regions", {}).items()}
    atomic_write_json(out / "results.json", summary)
    md = ["# wsnets main job", "", f"Zoo: `{res['zoo']}` (recipe `{res['recipe']}`); held-out test split by model.", "",
          results_table(res), "", "Plots: " + ", ".join(f"`{k}`" for k, v in plots.items() if not v.startswith("not"))]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (reports never need a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path, title: str) -> bool:
    """Title, lay out, write and close a report figure."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _test_predictions(run_dir: Path, zoo: str, target: str, filter: dict | None = None  # noqa: A002
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    from .train.meta_model import MetaModel
    from .zoo import ZooDataset
    if not (run_dir / "config.json").is_file():
        return None
    mm = MetaModel.load(run_dir)
    ds = ZooDataset(zoo, mm.representation, targets=[target], split="test", split_seed=0, filter=filter)
    nets = ds.weightspaces()
    pred = torch.empty(len(nets))
    groups: dict[Any, list[int]] = {}
    for i, w in enumerate(nets):  # one predict call per architecture (feature widths differ by depth)
        groups.setdefault(w.arch, []).append(i)
    for idx in groups.values():
        pred[torch.tensor(idx)] = torch.tensor([p[target] for p in mm.predict_records([nets[i] for i in idx])])
    true = torch.tensor([ds.target(r, target) for r in ds.rows])
    return pred, true


def _plot_predictions(res: dict, path: Path) -> bool:
    plt = _pyplot()
    runs = Path(path).parent / "runs"
    items = []
    for m in res["methods"]:
        if m == "esd-alpha" or res["methods"][m].get("error"):
            continue
        flt = dict(res.get("filter") or {})
        if res["methods"][m].get("only_architecture"):
            flt["arch_desc"] = res["methods"][m]["only_architecture"]
        got = _test_predictions(runs / m, res["zoo"], "test_acc", flt)
        if got is not None:
            items.append((m, *got))
    if not items:
        return False
    n = len(items)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax, (m, pred, true) in zip(axes.flat, items):
        tau = res["methods"][m]["test"]["test_acc"]["kendall_tau"]["mean"]
        ax.scatter(true, pred, s=6, alpha=0.5)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="ideal")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="true test accuracy", ylabel="predicted test accuracy",
               title=f"{_label(m)}{' †' if res['methods'][m].get('only_architecture') else ''}\n"
                     f"Kendall τ = {tau:.3f}, n = {len(true)}")
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(plt, fig, path, f"Predicted vs true test accuracy on held-out models ({res['recipe']})")


def alpha_note(r: dict) -> str:
    """What the mean-α row's numbers are: τ and R² of a line fitted on the training split (so τ carries the
    sign of the slope), against τ of α itself (the plot)."""
    parts = []
    for tg in REGRESSION:
        slope = r["slope"].get(tg)
        raw = r["test"].get(tg, {}).get("kendall_tau_raw_alpha", {}).get("mean")
        if slope is None or raw is None:
            continue
        parts.append(f"{TARGET_LABEL[tg].split(' (')[0]}: slope {slope:+.3g}, τ(α) = {raw:+.3f}")
    return ("mean ESD α with no training: τ and R² are those of a line fitted on the training split (target against "
            "mean α), so τ is τ(α) times the sign of the slope; τ of α itself (the plot): " + "; ".join(parts) + ".")


def _plot_alpha(res: dict, path: Path) -> bool:
    plt = _pyplot()
    a = res["methods"].get("esd-alpha", {}).get("alpha")
    if not a:
        return False
    alpha, acc, gap = (torch.tensor(a[k]) for k in ("test_alpha", "test_acc", "gen_gap"))
    ok = torch.isfinite(alpha)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    r = res["methods"]["esd-alpha"]
    for ax, y, name in ((axes[0], acc, "test_acc"), (axes[1], gap, "gen_gap")):
        tau = r["test"][name]["kendall_tau_raw_alpha"]["mean"]
        slope = (r.get("slope") or {}).get(name)
        line = "" if slope is None else (f"\nline fitted on the training split: slope {slope:+.3g}, its τ = "
                                         f"{r['test'][name]['kendall_tau']['mean']:+.3f} (the table)")
        ax.scatter(alpha[ok], y[ok], s=6, alpha=0.5)
        ax.set(xlabel="mean power-law exponent α over layers (ESD)", ylabel=TARGET_LABEL[name],
               title=f"Kendall τ(α, {name}) = {tau:+.3f}  (n = {int(ok.sum())}){line}")
    return _save(plt, fig, path, "Heavy-tailed ESD metric vs generalization (Martin & Mahoney): held-out models")


def _plot_embeddings(res: dict, path: Path) -> bool:
    """PCA of the encoder embeddings of held-out region-zoo models, from the first region method (in
    the order trained) that has a neural encoder: HNP by default."""
    plt = _pyplot()
    from .nn.registry import represent
    from .train.meta_model import MetaModel
    from .zoo import ZooDataset
    from .zoo import open as open_zoo
    runs = [Path(path).parent / "runs" / f"regions-{m}" for m in res.get("regions", {})]
    runs = [r for r in runs if (r / "model.safetensors").is_file()]
    if not res.get("regions_zoo") or not runs:
        return False
    mm = MetaModel.load(runs[0])
    method = runs[0].name[len("regions-"):]
    last = open_zoo(res["regions_zoo"]).epochs[-1]
    ds = ZooDataset(res["regions_zoo"], "tensors", targets=["dataset", "task"], split="test", split_seed=0,
                    filter={"epoch": last})
    with torch.no_grad():
        z = mm.encoder(represent(mm.encoder, ds.weightspaces())).double()
    z = z - z.mean(0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    xy = z @ v[:2].T
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, target in zip(axes, ("dataset", "task")):
        labels = [r[target] for r in ds.rows]
        for name in sorted(set(labels)):
            idx = [i for i, l in enumerate(labels) if l == name]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=8, alpha=0.7, label=name)
        ax.set(xlabel=f"PC 1 of {_label(method)} embedding", ylabel="PC 2", title=f"coloured by {target}")
        ax.legend(fontsize=7, markerscale=2, loc="best")
    return _save(plt, fig, path, "Meta-model embeddings of held-out fine-tuned models (region zoo, PCA)")
