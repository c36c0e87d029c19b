from kiln import cli


def test_info_names_versions_extension_and_backends(capsys):
    cli.info()
    out = capsys.readouterr().out
    for needle in ("torch", "triton", "numba", "kiln._cuda", "linear_act", "cpu: cpu"):
        assert needle in out, needle
