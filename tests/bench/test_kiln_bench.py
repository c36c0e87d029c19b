"""`kiln bench` runs, writes its files and names what it does not know (correctness only:
timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln import cli
from kiln.bench import cases, runner


def test_every_case_builds_and_kiln_agrees_with_torch_on_it():
    for case in cases.CASES:
        if not case.quick:
            continue
        workload = case.build(torch.device("cpu"), torch.float64, False)
        ours, theirs = workload.kiln(*workload.args), workload.torch(*workload.args)
        if "step" in case.tags:  # an optimizer step returns nothing: compare what it updated
            ours, theirs = (torch.cat([p.flatten() for group in step.__self__.param_groups for p in group["params"]])
                            for step in (workload.kiln, workload.torch))
        if case.op == "dropout":  # different random streams: each keeps x / (1 - p) or zeroes
            (x,) = workload.args
            for out in (ours, theirs):
                kept = out != 0
                assert torch.allclose(out[kept], x[kept] / 0.9, rtol=1e-12) and 0.85 < kept.double().mean() < 0.95
            continue
        for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (ours, theirs)), strict=True):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-8), case.label


def test_run_writes_json_markdown_and_plots(tmp_path):
    selected = cases.select(["layer_norm", "mlp"], quick=True)
    result = runner.run(selected, torch.device("cpu"), compile=False, progress=False, quick=True)
    result["roofs"] = runner.measure_roofs(torch.device("cpu"), torch.float32, quick=True)
    paths = runner.write(result, tmp_path)
    assert {p.name for p in paths} == {"bench.json", "bench.md", "time_vs_size.png", "roofs.png"}
    data = json.loads((tmp_path / "bench.json").read_text())
    impls = {(r["op"], r["mode"], r["impl"]) for r in data["rows"]}
    assert ("layer_norm", "forward", "kiln[cpu]") in impls and ("layer_norm", "forward+backward", "torch") in impls
    assert ("mlp", "forward+backward", "kiln[cpu]") in impls and ("mlp", "forward", "torch") not in impls
    assert all(r["seconds"] > 0 for r in data["rows"])
    table = (tmp_path / "bench.md").read_text()
    assert "| layer_norm | 1024x1024 | forward |" in table and "torch / kiln[cpu]" in table

    # the README's table, regenerated from that bench.json between its markers
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- kiln bench: begin -->\nold table\n<!-- kiln bench: end -->\ntail\n")
    script = Path(__file__).resolve().parents[2] / "bench" / "update_readme.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "bench.json"), "--readme", str(readme),
                           "--command", "kiln bench layer_norm mlp --quick"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "old table" not in text and text.endswith("<!-- kiln bench: end -->\ntail\n")
    assert "`kiln bench layer_norm mlp --quick`" in text
    layer_norm_row = next(line for line in text.splitlines() if line.startswith("| layer_norm | 1024x1024 |"))
    assert layer_norm_row.count("x |") == 2  # eager / kiln in both modes, no compile column run
    mlp_row = next(line for line in text.splitlines() if line.startswith("| mlp |"))
    assert mlp_row.split("|")[3].strip() == "-"  # a model step has no forward-only time


def test_unknown_names_are_one_line_errors(capsys):
    assert cli.main(["bench", "lienar_act"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lienar_act" in err and "linear_act" in err
    with pytest.raises(ValueError, match="unknown benchmark"):
        cases.select(["nope"], quick=False)
