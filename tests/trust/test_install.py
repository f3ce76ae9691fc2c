"""An installable library: a wheel installed (not editable) into a fresh venv runs the README's tour from an
unrelated directory, recipes and configs addressed by name; a clone named ``wsnets`` beside the working
directory does not shadow the package (editable or installed)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TOUR = r'''
import os, sys
import torch.nn as nn
import wsnets, wsnets.zoo as wz
from wsnets.esd import analyze, summary
from wsnets.merge import greedy_soup
from wsnets.train import MetaModel, load_config, run_training
assert os.path.realpath(wsnets.__file__).startswith(os.path.realpath(sys.prefix)), wsnets.__file__

wz.build("digits-mlp", "zoos/digits-mlp", limit=40, progress=False)       # a shipped recipe, by name
zoo = wz.open("zoos/digits-mlp")
df = zoo.to_pandas()
assert type(df).__name__ == "DataFrame" and len(df) == 120
cfg = load_config("graph", ["encoder.hidden=8", "encoder.layers=1", "optim.epochs=1", "data.filter={epoch = 15}",
                            "log.progress=false"])
result = run_training(cfg, zoo="zoos/digits-mlp", out="runs/graph", plots=False)
net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
pred = MetaModel.load("runs/graph").predict([net])
assert type(pred).__name__ == "DataFrame" and 0 <= pred["test_acc"][0] <= 1 and "in_range" in pred
table = analyze(zoo[0].load())
assert type(table).__name__ == "DataFrame"
print(summary(table)["alpha"] > 0)
same = zoo.filter(arch_desc=zoo[0]["arch_desc"], epoch=15)
soup = greedy_soup([r.load() for r in same], "digits")
print("TOUR OK", wsnets.resources.names("recipe"))
'''


def _site_packages(venv: Path) -> Path:
    return Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A wheel of this source tree (built offline, from a copy) installed into a fresh venv that borrows this
    environment's dependencies (torch stays the same build) through a path entry."""
    d = tmp_path_factory.mktemp("install")
    src = d / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("wsnets", "zoo", "train"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(d / "dist"), str(src)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((d / "dist").glob("wsnets-*.whl"))
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    here = sysconfig.get_paths()["purelib"]
    (_site_packages(venv) / "borrowed.pth").write_text(here + "\n")  # a plain path: its .pth files (the editable
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",  # install)
                    str(wheel)], check=True, capture_output=True, timeout=600)  # are not run, so not active here
    return venv, wheel


def test_the_wheel_ships_recipes_and_configs(wheel_venv):
    import zipfile
    _, wheel = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    for kind, src in (("recipes", "zoo"), ("configs", "train")):
        want = {f"wsnets/{kind}/{p.name}" for p in (ROOT / src).glob("*.toml")}
        assert want and want <= set(names), sorted(want - set(names))
    assert not any(n.startswith(("tests/", "benchmarks/", "zoo/", "train/")) for n in names)


def test_the_installed_wheel_runs_the_tour_from_an_unrelated_directory(wheel_venv, tmp_path):
    venv, _ = wheel_venv
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "wsnets").mkdir()  # and a folder named like a clone beside it, with its train/ and zoo/
    for sub in ("train", "zoo"):
        (elsewhere / "wsnets" / sub).mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", WSNETS_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([str(venv / "bin" / "python"), "-c", TOUR], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "TOUR OK" in p.stdout and "digits-mlp" in p.stdout
    torch_version = subprocess.check_output([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                            text=True, env=env).strip()
    import torch
    assert torch_version == torch.__version__
    cli = subprocess.run([str(venv / "bin" / "wsnets"), "zoo", "build", "digits-mlp", "--limit", "4", "--out", "z", "--json"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stderr[-2000:]


def test_a_clone_named_wsnets_beside_the_working_directory_does_not_shadow_this_install(tmp_path):
    """This environment's own install (editable in development: the project root on sys.path)."""
    parent = tmp_path / "work"
    clone = parent / "wsnets"
    for sub in ("train", "zoo", "tests"):
        (clone / sub).mkdir(parents=True)
    (clone / "train" / "graph.toml").write_text("[encoder]\nname = 'graph'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import wsnets, wsnets.train as t; from wsnets.train import MetaModel, load_config; "
            "print(wsnets.__file__); print(t.__file__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=parent, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    pkg, train = p.stdout.split()
    assert Path(pkg).name == "__init__.py" and Path(train).parent.name == "train" and Path(train).parent.parent.name == "wsnets"
    assert not Path(train).is_relative_to(clone)
