"""kiln.nn.torch_twin: every `kiln train` model's twin runs torch only and computes what the kiln
model computes (outputs, loss, every gradient) in float64; the kiln.nn modules outside the tasks too."""

import dataclasses
import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln.nn.twin import KilnOpRecorder, TorchOps, TwinError, torch_twin
from kiln.train.tasks import all_tasks
from tests.numerics import BOUND, rel_err

TOL = BOUND[torch.float64]


def _tokens(high, *shape, low=0):
    return torch.randint(low, high, shape)


def _pad_tail(t, lengths):
    t = t.clone()
    for row, n in enumerate(lengths):
        t[row, n:] = 0
    return t


# task -> (batch, run(model, batch, is_twin) -> (outputs, loss)); torch RNG seeded before each run
def _digits_batch():
    return torch.randn(6, 64, dtype=torch.float64), _tokens(10, 6)


def _digits_run(model, batch, twin):
    x, y = batch
    out = model(x)
    cross_entropy = F.cross_entropy if twin else kiln.ops.cross_entropy
    return (out,), cross_entropy(out, y, label_smoothing=0.1)


def _curve_run(model, batch, twin):
    out = model(batch[0])
    return (out,), F.mse_loss(out, batch[1])


def _charlm_run(model, batch, twin):
    (chunk,) = batch
    return (model(chunk[:, :-1])[0],), model(chunk[:, :-1], chunk[:, 1:])[1]


def _translate_batch():
    src = _pad_tail(_tokens(20, 3, 9, low=3), [9, 6, 4])
    tgt = _pad_tail(_tokens(12, 3, 7, low=3), [7, 5, 3])
    return src, tgt


def _translate_run(model, batch, twin):
    src, tgt = batch
    return (model(src, tgt[:, :-1])[0],), model(src, tgt[:, :-1], tgt[:, 1:])[1]


def _textclass_run(model, batch, twin):
    tokens, labels = batch
    out = model(tokens)
    return (out,), F.cross_entropy(out, labels)


def _vae_run(model, batch, twin):
    torch.manual_seed(1)
    out = model(batch[0])
    torch.manual_seed(2)
    return out, -model.elbo(batch[0]).mean()


def _gan_run(model, batch, twin):
    images, labels = batch
    torch.manual_seed(1)
    out = (model(labels), model.discriminator(images, labels))
    torch.manual_seed(2)
    return out, sum(model.losses(images, labels))


def _ddpm_run(model, batch, twin):
    images, labels = batch
    t = torch.tensor([0, 17, 50, 99])
    out = model(images * 2 - 1, t, labels)
    torch.manual_seed(2)
    return (out,), model.loss(images, labels)


def _images():
    return torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 3, 3, 9])


IO = {
    "digits": (_digits_batch, _digits_run),
    "curve": (lambda: (torch.randn(8, 1, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)), _curve_run),
    "charlm": (lambda: (_tokens(128, 2, 13),), _charlm_run),
    "translate": (_translate_batch, _translate_run),
    "textclass": (lambda: (_pad_tail(_tokens(7, 3, 10, low=1), [10, 7, 4]), _tokens(2, 3)), _textclass_run),
    "vae": (lambda: (torch.rand(4, 64, dtype=torch.float64),), _vae_run),
    "gan": (_images, _gan_run),
    "ddpm": (_images, _ddpm_run),
}
MODELS = [(task, model) for task, t in all_tasks().items() for model in t.models]


def test_every_task_has_inputs_here():
    assert set(IO) == set(all_tasks())


def _no_dropout(config):
    """The default config with every dropout (and stochastic depth) at 0: kiln's dropout masks
    come from kiln's generator, torch's from torch's."""
    zero = {f.name: 0.0 for f in dataclasses.fields(config) if "dropout" in f.name or "drop_path" in f.name}
    return dataclasses.replace(config, **zero)


def _calls_kiln_ops(cls) -> bool:
    return re.search(r"\bops\.\w+\(", inspect.getsource(cls)) is not None


def _kiln_classes_left(twin):
    """Classes of kiln (outside the twin module's own) in the twin whose source calls kiln ops."""
    return {type(m).__qualname__ for m in twin.modules()
            if type(m).__module__.startswith("kiln") and type(m).__module__ != "kiln.nn.twin"
            and _calls_kiln_ops(type(m))}


def _run(model, batch, run, twin):
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    outputs, loss = run(model, batch, twin)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return outputs, loss, grads


@pytest.mark.parametrize("task,name", MODELS, ids=[f"{t}-{m}" for t, m in MODELS])
def test_twin_of_every_task_model_runs_torch_only_and_matches(task, name, monkeypatch):
    entry = all_tasks()[task].models[name]
    if task == "ddpm":   # the U-Net's step embedding is float32 whatever the model's dtype
        from kiln.models import diffusion

        embedding = diffusion.timestep_embedding
        monkeypatch.setattr(diffusion, "timestep_embedding", lambda t, dim: embedding(t, dim).double())
    torch.manual_seed(0)
    model = entry.cls(_no_dropout(entry.config)).double()
    twin = torch_twin(model)
    assert twin is not model
    assert not _kiln_classes_left(twin), _kiln_classes_left(twin)
    assert twin.state_dict().keys() == model.state_dict().keys()
    twin.load_state_dict(model.state_dict())
    model.load_state_dict(twin.state_dict())
    make_batch, run = IO[task]
    torch.manual_seed(123)
    batch = make_batch()

    with KilnOpRecorder() as spy:
        ours = _run(model, batch, run, False)
    assert spy.seen, "the kiln model ran no kiln op: the comparison would be vacuous"
    with KilnOpRecorder() as spy:
        theirs = _run(twin, batch, run, True)
    assert not spy.seen, f"the twin ran kiln ops: {sorted(spy.seen)}"

    for a, b in zip(ours[0], theirs[0], strict=True):
        assert rel_err(b, a) < TOL
    assert rel_err(theirs[1], ours[1]) < TOL
    assert ours[2].keys() == theirs[2].keys()
    for key, grad in ours[2].items():
        if grad is None:
            assert theirs[2][key] is None, key
        else:
            assert rel_err(theirs[2][key], grad) < TOL, key
    # eval mode (batch norm's running statistics, updated alike by the training step above)
    model.eval(), twin.eval()
    with torch.no_grad(), KilnOpRecorder() as spy:
        evaluated = run(twin, batch, True)[0]
    assert not spy.seen
    with torch.no_grad():
        for a, b in zip(run(model, batch, False)[0], evaluated, strict=True):
            assert rel_err(b, a) < TOL


def test_twin_keeps_weights_tied_and_state_dicts_load_both_ways():
    entry = all_tasks()["charlm"].models["transformer"]
    model = entry.build()
    twin = torch_twin(model)
    assert twin.head.weight is twin.embed.tokens.weight
    assert isinstance(model.head, kiln.nn.Linear) and type(twin.head) is nn.Linear   # the model is untouched
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    model.load_state_dict(twin.state_dict())
    assert torch.equal(model.embed.tokens.weight, twin.embed.tokens.weight)
    twin.load_state_dict(entry.build().state_dict())


def _modules():
    """kiln.nn modules the tasks do not use, with an input each."""
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    layer = kiln.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True,
                                            activation="gelu")
    decoder_layer = kiln.nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, norm_first=True)
    return [
        (kiln.nn.TransformerEncoder(layer, 2, norm=kiln.nn.LayerNorm(8)), (x,), nn.TransformerEncoder),
        (kiln.nn.TransformerDecoder(decoder_layer, 2), (x, x[:2]), nn.TransformerDecoder),
        (kiln.nn.GatedMLP(8, 12, activation="gelu_tanh", bias=True), (x,), kiln.nn.GatedMLP),
        (kiln.nn.RMSNorm(8, offset=1.0), (x,), nn.RMSNorm),
        (kiln.nn.LSTM(8, 6, num_layers=2, bidirectional=True), (x,), nn.LSTM),
        # proj_size runs a plain PyTorch step loop on the cpu form (no kiln op to spy on)
        (kiln.nn.LSTM(8, 6, num_layers=2, bidirectional=True, proj_size=3), (x,), nn.LSTM),
        (kiln.nn.LSTMCell(8, 6), (x[0],), nn.LSTMCell),
        (kiln.nn.RNNCell(8, 6, nonlinearity="relu"), (x[0],), nn.RNNCell),
        (kiln.nn.CellRNN(kiln.nn.ResidualRNNCell(8, 8), bidirectional=True), (x,), kiln.nn.CellRNN),
        (kiln.nn.CellRNN(kiln.nn.HighwayRNNCell(8, 8)), (x,), kiln.nn.CellRNN),
        (kiln.nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1), (x[:, :, None],),
         nn.ConvTranspose2d),
        (kiln.nn.Conv2d(5, 4, 3, padding="same", activation="tanh"), (x[:, :, None].expand(3, 5, 4, 8),),
         nn.Conv2d),
        (kiln.nn.MultiheadAttention(8, 2, kdim=4, vdim=6, add_bias_kv=True),
         (x, x[..., :4], x[..., :6]), nn.MultiheadAttention),
        (kiln.nn.LinearCrossEntropyLoss(8, 7, bias=True, label_smoothing=0.1),
         (x.reshape(-1, 8), torch.randint(0, 7, (15,))), kiln.nn.LinearCrossEntropyLoss),
        (kiln.nn.CrossEntropyLoss(weight=torch.rand(8, dtype=torch.float64), ignore_index=2),
         (x.reshape(-1, 8), torch.randint(0, 8, (15,))), nn.CrossEntropyLoss),
    ]


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _flat(o)]


@pytest.mark.parametrize("index", range(len(_modules())))
def test_twin_of_kiln_nn_modules_matches(index):
    torch.manual_seed(0)
    module, args, kind = _modules()[index]
    module = module.double()
    twin = torch_twin(module)
    assert isinstance(twin, kind)
    assert not _kiln_classes_left(twin)
    outs = []
    kiln_runs_ops = getattr(module, "proj_size", 0) == 0
    for m, spy_must_see in ((module, kiln_runs_ops), (twin, False)):
        m.zero_grad()
        inputs = tuple(a.detach().requires_grad_() if a.is_floating_point() else a for a in args)
        with KilnOpRecorder() as spy:
            out = _flat(m(*inputs))
            sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in out).backward()
        assert bool(spy.seen) == spy_must_see, spy.seen
        grads = {n: p.grad for n, p in m.named_parameters()}
        grads.update({f"input {i}": a.grad for i, a in enumerate(inputs) if a.is_floating_point()})
        outs.append((out, grads))
    (out, grads), (twin_out, twin_grads) = outs
    for a, b in zip(out, twin_out, strict=True):
        assert rel_err(b, a) < TOL
    assert grads.keys() == twin_grads.keys()
    for key in grads:
        assert rel_err(twin_grads[key], grads[key]) < TOL, key


@pytest.mark.parametrize("Tq,Tk,causal,padding", [(5, 5, True, False), (2, 7, True, True), (4, 6, False, True)])
def test_torch_attention_is_kilns(Tq, Tk, causal, padding):
    torch.manual_seed(0)
    q = torch.randn(2, 4, Tq, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, Tk, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if padding:   # the second row hides every key: its queries see nothing and give 0
        mask = torch.zeros(2, Tk, dtype=torch.bool)
        mask[0, -2:] = True
        mask[1] = True
    seed = torch.randn(2, 4, Tq, 8, dtype=torch.float64)
    results = []
    for attend in (kiln.ops.attention, TorchOps.attention):
        out = attend(q, k, v, causal=causal, key_padding_mask=mask)
        results.append((out, *torch.autograd.grad((out * seed).sum(), (q, k, v))))
    for a, b in zip(*results):
        assert rel_err(b, a) < TOL


def test_what_it_cannot_convert_is_named():
    class Scaled(kiln.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), Scaled(2, 3)))
    with pytest.raises(TwinError, match=r"1\.1 \(.*Scaled\)"):
        torch_twin(model)
