import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import wsnets
from wsnets.cli import main
from wsnets.errors import CheckpointError
from wsnets.esd import analyze, summary


def _bert_like(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embeddings.word_embeddings.weight": torch.randn(300, 32, generator=g),
          "embeddings.position_ids": torch.arange(64)[None],  # int buffer: ignored
          "embeddings.LayerNorm.weight": torch.ones(32)}  # 1-D: ignored
    for i in range(2):
        p = f"encoder.layer.{i}."
        sd[p + "attention.self.query.weight"] = torch.randn(32, 32, generator=g)
        sd[p + "attention.self.query.bias"] = torch.zeros(32)
        sd[p + "intermediate.dense.weight"] = torch.randn(128, 32, generator=g)
        sd[p + "output.dense.weight"] = torch.randn(32, 128, generator=g)
    return sd


def test_any_checkpoint_streamed_equals_in_memory(tmp_path):
    sd = _bert_like()
    path = tmp_path / "bert.safetensors"
    save_file(sd, str(path))
    mem = analyze(sd)
    streamed = analyze(path, memory_mb=1e-3)  # forces one tensor per chunk
    assert len(mem) == 7 and (mem["status"] == "success").all()
    assert set(mem.attrs["skipped"][0].split(":")[:1]) <= set(sd)
    assert len(mem.attrs["skipped"]) == 4
    for c in ("alpha", "log_norm", "stable_rank"):
        np.testing.assert_allclose(streamed[c], mem[c], rtol=1e-12)


def test_half_precision_tensors_are_analyzed_in_float64(tmp_path):
    w = torch.randn(64, 48)
    save_file({"h.weight": w.to(torch.bfloat16), "f.weight": w.to(torch.bfloat16).float()}, str(tmp_path / "h.safetensors"))
    df = analyze(tmp_path / "h.safetensors").set_index("name")
    assert df.loc["h.weight", "status"] == "success"
    assert df.loc["h.weight", "alpha"] == df.loc["f.weight", "alpha"]  # same values, same float64 computation


def test_batched_weightspace_rows_equal_single_networks():
    ws = wsnets.WeightSpace.random(wsnets.mlp(20, [16], 12), batch_size=3)
    df = analyze(ws)
    assert list(df["model"]) == [0, 0, 1, 1, 2, 2]
    one = analyze(ws[2])
    np.testing.assert_allclose(df[df["model"] == 2]["alpha"], one["alpha"], rtol=1e-12)


def test_bad_layers_get_a_status_and_the_rest_is_reported(tmp_path):
    sd = _bert_like()
    sd["encoder.layer.0.attention.self.query.weight"][3, 4] = float("nan")
    sd["tiny.weight"] = torch.randn(6, 5)
    df = analyze(sd)
    row = df.set_index("name").loc["encoder.layer.0.attention.self.query.weight"]
    assert row["status"] == "failed: 1 NaN and 0 Inf of 1024 weights" and np.isnan(row["alpha"])
    assert df.set_index("name").loc["tiny.weight", "status"] == "skipped: 5 eigenvalue(s) < min_evals=8"
    assert (df["status"] == "success").sum() == 6
    s = summary(df)
    assert s["num_fitted"] == 6 and s["num_skipped"] == 2 and np.isfinite(s["alpha"])


def test_cli_text_json_plots_and_errors(tmp_path, capsys):
    sd = _bert_like()
    sd["tiny.weight"] = torch.randn(3, 3)
    sd["nan.weight"] = torch.full((20, 20), float("nan"))
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    assert main(["esd", str(path), "--json", "--mp-fit", "--plot", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    status = {r["name"]: r["status"] for r in out["layers"]}
    assert status["tiny.weight"].startswith("skipped") and status["nan.weight"].startswith("failed: 400 NaN")
    assert out["summary"]["num_fitted"] == 7
    assert all("num_spikes" in r for r in out["layers"] if r["status"] == "success")
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "alpha_per_layer.png" in pngs and len(pngs) == 8  # 7 fitted + NaN layer has no ESD; + alpha plot
    assert main(["esd", str(path)]) == 0
    text = capsys.readouterr().out
    assert "skipped: 3 eigenvalue(s) < min_evals=8" in text and "failed: 400 NaN" in text
    assert main(["esd", str(path), "--per-slice"]) == 0  # no conv layers: same rows
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{path}: 9 layer row(s), 7 fitted")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert main(["esd", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == f"wsnets esd: error: {empty}: file is empty"
    if not torch.cuda.is_available():
        assert main(["esd", str(path), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    only_biases = tmp_path / "b.safetensors"
    save_file({"bias": torch.zeros(3)}, str(only_biases))
    assert main(["esd", str(only_biases)]) == 2
    assert "no 2-D, 3-D or 4-D floating-point weight tensor" in capsys.readouterr().err
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00\x01garbage")
    assert main(["esd", str(garbage)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_pt_checkpoint_and_module_inputs(tmp_path):
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    a, b = analyze(tmp_path / "m.pt"), analyze(model)
    np.testing.assert_allclose(a["alpha"], b["alpha"])
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        analyze(tmp_path / "m.txt")


def test_randomize_separates_structure_from_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 100, generator=g)
    u, v = torch.randn(200, 3, generator=g), torch.randn(3, 100, generator=g)
    structured = noise + 3.0 * u @ v  # strong low-rank signal: shuffling destroys it
    df = analyze({"noise.weight": noise, "structured.weight": structured}, randomize=True)
    d = df.set_index("name")["rand_distance"]
    assert d["structured.weight"] > 3 * d["noise.weight"]
    assert (df["num_traps"] == 0).all()  # a shuffled matrix has no spikes left
