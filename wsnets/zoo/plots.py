"""Zoo plots: the test-accuracy histogram of ``wsnets zoo info --plot``."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write


def accuracy_histogram(zoo, path: str | Path) -> Path:
    """Histogram of test accuracy at every checkpoint epoch (one colour per epoch), chance level marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from . import datasets as zds

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    epochs = zoo.epochs
    bins = [i / 40 for i in range(41)]
    cmap = plt.get_cmap("viridis")
    for j, e in enumerate(epochs):
        acc = [r["test_acc"] for r in zoo.rows if r["epoch"] == e]
        ax.hist(acc, bins=bins, histtype="step", linewidth=1.8, color=cmap(0.85 * j / max(1, len(epochs) - 1)),
                label=f"epoch {e} ({len(acc)} models)")
    classes = {zds.info(d)["num_classes"] for d in {r["dataset"] for r in zoo.rows} if _known(d)}
    if len(classes) == 1:
        ax.axvline(1 / classes.pop(), color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # headroom so the legend covers no bars
    ax.set_xlabel("test accuracy (fraction correct)")
    ax.set_ylabel("number of checkpoints")
    n_models = len({r["model_id"] for r in zoo.rows})
    ax.set_title(f"Zoo {zoo.meta.get('recipe') or zoo.root.name}: test accuracy of {n_models} models")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _known(name: str) -> bool:
    from . import datasets as zds
    try:
        zds.info(name)
        return True
    except Exception:
        return False
