from kiln import cli


def test_info_names_versions_extension_and_backends(capsys):
    cli.info()
    out = capsys.readouterr().out
    for needle in ("torch", "triton", "numba", "kiln._cuda", "linear_act", "cpu: cpu"):
        assert needle in out, needle


def _one_line_error(capsys, argv, needle):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err


def test_bad_kiln_backend_environment_is_one_line_status_2(capsys, monkeypatch):
    monkeypatch.setenv("KILN_BACKEND", "bogus")
    _one_line_error(capsys, ["info"], "KILN_BACKEND='bogus'")


def test_cuda_device_without_a_gpu_is_one_line_status_2(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["train", "digits", "--device", "cuda"], "--device cuda")


def test_bad_flag_values_are_one_line_status_2(capsys):
    _one_line_error(capsys, ["train", "digits", "--epochs", "x"], "--epochs")
    _one_line_error(capsys, ["train", "digits", "--epochs", "0"], "must be >= 1")
    _one_line_error(capsys, ["train", "digits", "--lr", "-1"], "--lr")
    _one_line_error(capsys, ["train", "digits", "--max-steps", "0"], "--max-steps")
    _one_line_error(capsys, ["train", "digits", "--model", "relux"], "no model 'relux'")
    _one_line_error(capsys, ["nope"], "invalid choice")


def test_a_backend_that_cannot_run_is_one_line_status_2(capsys):
    _one_line_error(capsys, ["train", "digits", "--backend", "cuda", "--epochs", "1"], "cuda")


def test_every_flag_has_help_text():
    parser = cli.build_parser()
    subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"kiln {name}: {action.dest} has no help text"
