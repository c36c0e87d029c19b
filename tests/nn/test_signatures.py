"""A kiln.nn class named like a torch.nn class is its drop-in: the same constructor and forward
arguments (names, order, defaults, keyword-only markers). kiln may add keyword-only arguments
with defaults after torch's (``kiln.nn.Linear(..., activation="relu")``), nothing else."""

import inspect

import pytest
import torch

import kiln.nn

TWINS = sorted(name for name in kiln.nn.__all__
               if isinstance(getattr(torch.nn, name, None), type)
               and issubclass(getattr(torch.nn, name), torch.nn.Module))


# torch's recurrent layers take (*args, **kwargs) and document their arguments: compare with those.
def _rnn(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
         dropout=0.0, bidirectional=False, device=None, dtype=None): ...
def _lstm(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
          bidirectional=False, proj_size=0, device=None, dtype=None): ...
def _gru(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
         bidirectional=False, device=None, dtype=None): ...


DOCUMENTED_CONSTRUCTORS = {"RNN": _rnn, "LSTM": _lstm, "GRU": _gru}


def _parameters(function):
    return list(inspect.signature(function).parameters.values())


def _assert_same_arguments(kiln_function, torch_function, where):
    ours, theirs = _parameters(kiln_function), _parameters(torch_function)
    assert len(ours) >= len(theirs), f"{where}: kiln takes fewer arguments than torch: {ours} vs {theirs}"
    for mine, torch_parameter in zip(ours, theirs):
        assert (mine.name, mine.kind, mine.default) == (
            torch_parameter.name, torch_parameter.kind, torch_parameter.default), (
            f"{where}: kiln's {mine} where torch has {torch_parameter}")
    for extra in ours[len(theirs):]:
        assert extra.kind == inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty, (
            f"{where}: kiln's extra argument {extra} must be keyword-only with a default")


def test_documented_constructors_are_what_torch_takes():
    for name, documented in DOCUMENTED_CONSTRUCTORS.items():
        names = [p.name for p in _parameters(documented)][1:]
        module = getattr(torch.nn, name)(*[{"input_size": 3, "hidden_size": 4}.get(n, None) for n in names[:2]])
        assert all(hasattr(module, n) for n in names if n not in ("device", "dtype")), name


def test_there_are_twins_to_compare():
    assert {"Linear", "LayerNorm", "MultiheadAttention", "LSTM", "CrossEntropyLoss"} <= set(TWINS)


@pytest.mark.parametrize("name", TWINS)
def test_constructor_takes_torchs_arguments(name):
    ours, theirs = getattr(kiln.nn, name).__init__, getattr(torch.nn, name).__init__
    if name in DOCUMENTED_CONSTRUCTORS and [p.kind for p in _parameters(ours)][1:] != [
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
        theirs = DOCUMENTED_CONSTRUCTORS[name]    # kiln spells out what torch parses from *args
    _assert_same_arguments(ours, theirs, f"kiln.nn.{name}.__init__")


@pytest.mark.parametrize("name", TWINS)
def test_forward_takes_torchs_arguments(name):
    _assert_same_arguments(getattr(kiln.nn, name).forward, getattr(torch.nn, name).forward,
                           f"kiln.nn.{name}.forward")
