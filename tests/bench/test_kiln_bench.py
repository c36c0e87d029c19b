"""`kiln bench` runs, writes its files and names what it does not know (correctness only:
timings are not asserted)."""

import json

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
        assert torch.allclose(ours, theirs, rtol=1e-8, atol=1e-8), case.label


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


def test_unknown_names_are_one_line_errors(capsys):
    assert cli.main(["bench", "lienar_act"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lienar_act" in err and "linear_act" in err
    with pytest.raises(ValueError, match="unknown benchmark"):
        cases.select(["nope"], quick=False)
