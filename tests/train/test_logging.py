"""Run logging: JSON lines always; wandb only when asked, offline without network."""

import math

import pytest

from wsnets.train.logging import RunLogger, read_jsonl, wandb_mode


def test_wandb_mode_rules(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(False) is None and wandb_mode(True) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(True) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(False) == "offline"


def test_jsonl_and_inactive_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = RunLogger(tmp_path / "log.jsonl", console=False)
    log.log("epoch", step=0, train_loss=0.5, val={"loss": float("nan"), "tau": 0.3})
    log.log("test", seed=1, acc=0.9)
    recs = read_jsonl(tmp_path / "log.jsonl")
    assert [r["event"] for r in recs] == ["epoch", "test"]
    assert recs[0]["val"] == {"loss": None, "tau": 0.3} and recs[0]["step"] == 0   # NaN -> null (valid JSON)
    quiet = RunLogger(tmp_path / "other.jsonl", active=False)
    quiet.log("epoch", x=1)
    assert not (tmp_path / "other.jsonl").exists()


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLogger(tmp_path / "log.jsonl", console=False, config={"a": 1}, wandb_dir=tmp_path)
    assert log.wandb_run is not None
    log.log("epoch", step=0, train_loss=1.25, val={"tau": 0.5})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert not math.isnan(read_jsonl(tmp_path / "log.jsonl")[0]["train_loss"])
