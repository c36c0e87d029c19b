"""`kiln experiment NAME --quick`: each experiment runs in seconds and writes its table and plot."""

import pytest

from kiln.cli import main
from kiln.train import experiments as E


def _written(out, stem):
    md, png = out / f"{stem}-quick.md", out / f"{stem}-quick.png"
    assert md.exists() and png.exists() and png.stat().st_size > 1000
    text = md.read_text()
    assert "--quick" in text and "|---|" in text
    return text


def test_init_experiment_from_the_command_line(tmp_path, capsys):
    assert main(["experiment", "init", "--quick", "--out", str(tmp_path)]) == 0
    text = _written(tmp_path, "experiment_init")
    assert "he_normal" in text and "normal std 0.01" in text


def test_init_experiment_shows_he_keeping_the_signal_and_small_init_losing_it(tmp_path):
    rows = {r["name"]: r for r in E.run("init", tmp_path, quick=True, log=lambda s: None)}
    he, small = rows["he_normal"]["acts"], rows["normal std 0.01"]["acts"]
    assert all(0.25 < v < 4 for v in he), he
    assert small[-1] < 1e-10 * small[0]


def test_lottery_ticket_experiment_prunes_to_each_sparsity(tmp_path):
    rows = E.run("lottery-ticket", tmp_path, quick=True, log=lambda s: None)
    assert [r["sparsity"] for r in rows] == [0.0, 0.5, 0.9]
    assert all(0.0 <= r["ticket"] <= 1.0 and 0.0 <= r["random"] <= 1.0 for r in rows)
    _written(tmp_path, "experiment_lottery_ticket")


def test_regularizers_experiment_covers_every_setting(tmp_path):
    rows = E.run("regularizers", tmp_path, quick=True, log=lambda s: None)
    assert [r["name"] for r in rows] == [s.name for s in E.SETTINGS]
    assert all(r["test"] > 0.5 for r in rows)   # one epoch already learns the digits
    text = _written(tmp_path, "experiment_regularizers")
    assert all(s.name in text for s in E.SETTINGS)


def test_bad_experiment_is_a_usage_error(capsys, tmp_path):
    assert main(["experiment", "nope", "--out", str(tmp_path)]) == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="experiment"):
        E.run("nope", tmp_path)
