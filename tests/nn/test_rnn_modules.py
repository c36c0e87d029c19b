"""kiln.nn.LSTM / GRU / RNN / RNNCell against torch's modules (float64, same state_dict):
tensor, unbatched and PackedSequence input (sorted and unsorted), proj_size, dropout,
the constructor and forward signatures, torch's attributes, errors, torch.compile."""

import inspect

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import kiln
from tests.numerics import BOUND, rel_err

F64 = torch.float64

# (torch class, extra constructor arguments)
KINDS = {
    "RNN_TANH": ("RNN", {}),
    "RNN_RELU": ("RNN", {"nonlinearity": "relu"}),
    "GRU": ("GRU", {}),
    "LSTM": ("LSTM", {}),
    "LSTM_PROJ": ("LSTM", {"proj_size": 3}),
}


def _twins(kind, **kwargs):
    name, extra = KINDS[kind]
    theirs = getattr(torch.nn, name)(dtype=F64, **extra, **kwargs)
    ours = getattr(kiln.nn, name)(dtype=F64, **extra, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _states(kind, module, B, g):
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    if kind.startswith("LSTM"):
        P = module.proj_size or H
        return (torch.randn(module.num_layers * D, B, P, generator=g, dtype=F64),
                torch.randn(module.num_layers * D, B, H, generator=g, dtype=F64))
    return torch.randn(module.num_layers * D, B, H, generator=g, dtype=F64)


def _leaves(hx):
    return tuple(h.clone().requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_()


def _flat(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


def _compare(ours, theirs, x, hx, bound=BOUND[F64]):
    """Forward outputs, final states and every gradient (input, initial states, weights)."""
    g = torch.Generator().manual_seed(5)
    outs = []
    for module in (ours, theirs):
        xi = x
        if isinstance(x, PackedSequence):
            xi = x._replace(data=x.data.clone().requires_grad_())
            leaf = xi.data
        else:
            xi = leaf = x.clone().requires_grad_()
        h = None if hx is None else _leaves(hx)
        out, fin = module(xi, h)
        data = out.data if isinstance(out, PackedSequence) else out
        w = torch.randn(data.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
        loss = (data * w).sum() + sum(s.square().sum() for s in _flat(fin))
        loss.backward()
        outs.append((out, fin, leaf.grad, None if h is None else [s.grad for s in _flat(h)],
                     [p.grad.clone() for p in module.parameters()]))
        module.zero_grad()
    (o, f, dx, dh, dw), (o_t, f_t, dx_t, dh_t, dw_t) = outs
    if isinstance(o_t, PackedSequence):
        assert isinstance(o, PackedSequence)
        assert torch.equal(o.batch_sizes, o_t.batch_sizes)
        for a, b in ((o.sorted_indices, o_t.sorted_indices), (o.unsorted_indices, o_t.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        o, o_t = o.data, o_t.data
    assert o.shape == o_t.shape and rel_err(o, o_t) < bound, "output"
    assert [s.shape for s in _flat(f)] == [s.shape for s in _flat(f_t)]
    for a, b in zip(_flat(f), _flat(f_t)):
        assert rel_err(a, b) < bound, "final state"
    assert rel_err(dx, dx_t) < bound, "d input"
    if dh is not None:
        for a, b in zip(dh, dh_t):
            assert rel_err(a, b) < bound, "d initial state"
    for (name, _), a, b in zip(ours.named_parameters(), dw, dw_t):
        assert rel_err(a, b) < bound, name


CONFIGS = [(1, False, False), (2, True, True)]


@pytest.mark.parametrize("layers,bidirectional,batch_first", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_tensor_input_matches_torch(kind, layers, bidirectional, batch_first):
    ours, theirs = _twins(kind, input_size=4, hidden_size=37, num_layers=layers, bidirectional=bidirectional,
                          batch_first=batch_first)
    g = torch.Generator().manual_seed(0)
    T, B = 5, 3
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), generator=g, dtype=F64)
    _compare(ours, theirs, x, _states(kind, ours, B, g))
    _compare(ours, theirs, x, None)  # default zero states


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("layers,bidirectional,batch_first", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_input_matches_torch(kind, layers, bidirectional, batch_first, enforce_sorted):
    ours, theirs = _twins(kind, input_size=4, hidden_size=6, num_layers=layers, bidirectional=bidirectional,
                          batch_first=batch_first)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 6, 4, 1, 3]) if not enforce_sorted else torch.tensor([6, 6, 4, 3, 1])
    T, B = 6, len(lengths)
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), generator=g, dtype=F64)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    _compare(ours, theirs, packed, _states(kind, ours, B, g))
    _compare(ours, theirs, packed, None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_step_and_unbatched_match_torch(kind):
    ours, theirs = _twins(kind, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(2)
    _compare(ours, theirs, torch.randn(1, 2, 3, generator=g, dtype=F64), _states(kind, ours, 2, g))  # T = 1
    hx = _states(kind, ours, 1, g)
    unbatched = tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]
    _compare(ours, theirs, torch.randn(4, 3, generator=g, dtype=F64), unbatched)
    for bf in (True, False):  # batch_first is ignored for unbatched input
        ours.batch_first = theirs.batch_first = bf
        _compare(ours, theirs, torch.randn(4, 3, generator=g, dtype=F64), None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_empty_batch_and_empty_sequence_as_torch(kind):
    ours, theirs = _twins(kind, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 0, 3, dtype=F64, requires_grad=True)
    out, fin = ours(x)
    out_t, fin_t = theirs(x)
    assert out.shape == out_t.shape
    assert [s.shape for s in _flat(fin)] == [s.shape for s in _flat(fin_t)]
    (out.sum() + sum(s.sum() for s in _flat(fin))).backward()
    for p in ours.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    for module in (ours, theirs):
        with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
            module(torch.randn(0, 2, 3, dtype=F64))


@pytest.mark.parametrize("kind,packed", [("RNN_TANH", True), ("GRU", False), ("LSTM_PROJ", True)])
def test_dropout_between_layers_draws_torchs_mask(kind, packed):
    ours, theirs = _twins(kind, input_size=3, hidden_size=5, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(6, 4, 3, dtype=F64)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([6, 2, 5, 1]), enforce_sorted=False)
    results = []
    for module in (ours, theirs):
        torch.manual_seed(7)
        results.append(module(x)[0])
    a, b = (r.data if packed else r for r in results)
    assert rel_err(a, b) < BOUND[F64]
    torch.manual_seed(8)
    assert not torch.equal(ours(x)[0].data if packed else ours(x)[0], a)  # a new mask
    ours.eval()
    first = ours(x)[0]
    assert torch.equal(first.data if packed else first, ours(x)[0].data if packed else ours(x)[0])


def _parameters(function):
    """Names, kinds and defaults (annotations aside: torch's are evaluated, ours strings)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell"])
def test_signatures_and_attributes_are_torchs(name):
    ours, theirs = getattr(kiln.nn, name), getattr(torch.nn, name)
    assert _parameters(ours.__init__) == _parameters(theirs.__init__)
    assert _parameters(ours.forward) == _parameters(theirs.forward)
    if name.endswith("Cell"):
        return
    kwargs = {"proj_size": 2} if name == "LSTM" else {"nonlinearity": "relu"} if name == "RNN" else {}
    o = ours(3, 4, 2, bias=False, batch_first=True, bidirectional=True, **kwargs)
    t = theirs(3, 4, 2, bias=False, batch_first=True, bidirectional=True, **kwargs)
    assert not isinstance(o, torch.nn.RNNBase)  # what dynamo refuses to trace
    assert repr(o).replace("kiln", "torch") == repr(t)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "_flat_weights_names", "_all_weights"):
        assert getattr(o, attr) == getattr(t, attr), attr
    assert [[p.shape for p in w] for w in o.all_weights] == [[p.shape for p in w] for w in t.all_weights]
    assert [w.shape for w in o._flat_weights] == [w.shape for w in t._flat_weights]
    assert [(n, p.shape) for n, p in o.named_parameters()] == [(n, p.shape) for n, p in t.named_parameters()]
    o.flatten_parameters()
    o.double()  # _apply refreshes _flat_weights
    assert all(w.dtype == F64 for w in o._flat_weights)
    o.weight_ih_l0 = torch.nn.Parameter(torch.zeros_like(o.weight_ih_l0))  # __setattr__ keeps them current
    assert o._flat_weights[0] is o.weight_ih_l0


def test_constructor_errors_are_torchs():
    for name in ("RNN", "GRU", "LSTM"):
        for args, kwargs in [((3, 4), {"dropout": 1.5}), ((3, 0), {}), ((3, 4), {"num_layers": 0}),
                             ((3, 4), {"bias": 1}), ((3, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10), {})]:
            errors = []
            for module in (getattr(torch.nn, name), getattr(kiln.nn, name)):
                with pytest.raises(Exception) as info:
                    module(*args, **kwargs)
                errors.append(type(info.value))
            assert errors[0] is errors[1], (name, args, kwargs)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        kiln.nn.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        kiln.nn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        kiln.nn.LSTM(3, 4, proj_size=4)


def test_forward_errors_name_the_shapes():
    for name, hx in (("GRU", torch.zeros(1, 3, 5)), ("LSTM", (torch.zeros(1, 2, 5), torch.zeros(1, 3, 5)))):
        with pytest.raises(RuntimeError, match=r"Expected hidden(\[1\])? size \(1, 2, 5\), got \[1, 3, 5\]"):
            getattr(kiln.nn, name)(4, 5)(torch.randn(7, 2, 4), hx)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. Expected 4, got 3"):
        kiln.nn.RNN(4, 5)(torch.randn(7, 2, 3))
    with pytest.raises(ValueError, match="RNN: Expected input to be 2D or 3D, got 4D tensor instead"):
        kiln.nn.RNN(4, 5)(torch.randn(7, 2, 3, 4))
    with pytest.raises(RuntimeError, match="For batched 3-D input, hx should also be 3-D but got 2-D tensor"):
        kiln.nn.RNN(4, 5)(torch.randn(7, 2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="does not match weight dtype"):
        kiln.nn.GRU(4, 5)(torch.randn(7, 2, 4, dtype=F64))


@pytest.mark.parametrize("kind", ["RNN_RELU", "GRU", "LSTM", "LSTM_PROJ"])
def test_compile_fullgraph_without_allow_rnn(kind):
    """No torch._dynamo.config.allow_rnn: the modules are not nn.RNN / GRU / LSTM to dynamo."""
    assert not torch._dynamo.config.allow_rnn
    torch._dynamo.reset()
    ours, _ = _twins(kind, input_size=3, hidden_size=5, num_layers=2, bidirectional=True, batch_first=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, generator=g, dtype=F64)
    hx = _states(kind, ours, 2, g)

    def loss(module, x, hx):
        out, fin = module(x, hx)
        return out.square().sum() + sum(s.sum() for s in _flat(fin))

    compiled = torch.compile(ours, fullgraph=True)
    results = []
    for module in (compiled, ours):
        xi, h = x.clone().requires_grad_(), _leaves(hx)
        value = loss(module, xi, h)
        value.backward()
        results.append([value, xi.grad, *[s.grad for s in _flat(h)], *[p.grad.clone() for p in ours.parameters()]])
        ours.zero_grad()
    for a, b in zip(*results):
        assert rel_err(a, b) < BOUND[F64]


@pytest.mark.parametrize("name,nonlinearity", [("RNNCell", "tanh"), ("RNNCell", "relu"), ("GRUCell", None),
                                                ("LSTMCell", None)])
def test_cells_match_torch(name, nonlinearity):
    extra = {"nonlinearity": nonlinearity} if nonlinearity else {}
    theirs = getattr(torch.nn, name)(4, 37, dtype=F64, **extra)
    ours = getattr(kiln.nn, name)(4, 37, dtype=F64, **extra)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(4)
    for shape in ((3, 4), (4,), (0, 4)):  # batched, unbatched, empty batch
        x = torch.randn(shape, generator=g, dtype=F64)
        h = torch.randn((*shape[:-1], 37), generator=g, dtype=F64)
        hx = (h, h.clone()) if name == "LSTMCell" else h
        results = []
        for module in (ours, theirs):
            xi, hi = x.clone().requires_grad_(), _leaves(hx)
            out = module(xi, hi)
            sum(o.square().sum() for o in _flat(out)).backward()
            results.append([*_flat(out), xi.grad, *[s.grad for s in _flat(hi)],
                            *[p.grad.clone() for p in module.parameters()]])
            module.zero_grad()
        for a, b in zip(*results):
            assert a.shape == b.shape and rel_err(a, b) < BOUND[F64]


def test_cell_rnn_runs_the_notes_cells():
    cell = kiln.nn.ResidualRNNCell(4, 4, dtype=F64)
    rnn = kiln.nn.CellRNN(cell, bidirectional=True)
    out, h_n = rnn(torch.randn(5, 2, 4, dtype=F64))
    assert out.shape == (5, 2, 8) and h_n.shape == (2, 2, 4)
