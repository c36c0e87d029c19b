"""kiln.patch on plain torch, Hugging Face transformers and timm models built from config.

Each model is patched in place and compared with an unpatched deep copy of itself: outputs in
eval, and one training step's loss and every parameter's gradient (dropout 0, so both runs see
the same function), in float32 within tests/numerics.py's bound. Nothing is downloaded: every
model is built from a config with random weights. A library that is not installed skips its
tests with the reason.
"""

from __future__ import annotations

import copy
import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch
from torch import nn

import kiln
from tests.numerics import BOUND, rel_err

F32 = BOUND[torch.float32]


def install_torchvision_stand_in() -> None:
    """A stand-in ``torchvision`` for importing timm where torchvision does not import.

    timm imports torchvision when it is imported (timm.layers: ``torchvision.ops.misc.
    FrozenBatchNorm2d``; timm.data: datasets, transforms and InterpolationMode, used at import
    to build tables), and pip's torchvision does not import beside a CUDA build of torch. The
    models these tests build (a ResNet and a ViT, pretrained=False) never call torchvision, so
    every ``torchvision.*`` module here is an empty one whose names are placeholder classes,
    except FrozenBatchNorm2d: a BatchNorm2d with frozen (buffer, not parameter) statistics."""

    class _Placeholder(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _placeholder(f"{cls.__name__}.{name}")

    def _placeholder(name):
        return _Placeholder(name, (), {"__init__": lambda self, *a, **k: None})

    class _StandInModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = _placeholder(name)
            setattr(self, name, value)
            return value

    class FrozenBatchNorm2d(nn.BatchNorm2d):
        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__(num_features, eps=eps, affine=False, track_running_stats=True)
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = _StandInModule(spec.name)
            module.__path__ = []
            if spec.name == "torchvision.ops.misc":
                module.FrozenBatchNorm2d = FrozenBatchNorm2d
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


@pytest.fixture(scope="module")
def timm():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or pip's build does not import beside this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        install_torchvision_stand_in()
    return pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")


@pytest.fixture(scope="module")
def transformers():
    module = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
    module.logging.set_verbosity_error()
    return module


@pytest.fixture
def calls(monkeypatch):
    """How often each kiln op ran: the patched model must really use kiln, not only look patched."""
    counts: dict = {}
    for name in ("attention", "rotary_embedding", "swiglu", "linear_cross_entropy", "rms_norm", "linear_act",
                 "layer_norm", "batch_norm"):
        real = getattr(kiln.ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kiln.ops, name, spy)
    return counts


def _types(model):
    return {name: type(m) for name, m in model.named_modules()}


def _like(model, t):
    """t in the model's floating dtype (the float64 reference takes float64 inputs)."""
    return t.to(next(model.parameters()).dtype) if t.is_floating_point() else t


def check_patched(model, run, loss_of, bound=F32, ops=None):
    """Patch ``model`` (float32); its eval outputs, training loss and every gradient must match
    an unpatched float64 copy's (the oracle, as every kiln test), its Parameter objects must be
    the same ones, and patching again must change nothing. ``run(m)`` and ``loss_of(m)`` cast
    their float inputs with ``_like(m, x)``. Returns the report."""
    torch.manual_seed(0)
    reference = copy.deepcopy(model).double()
    params_before = [id(p) for p in model.parameters()]
    report = kiln.patch(model, ops=ops)
    assert report.replaced, str(report)
    assert [id(p) for p in model.parameters()] == params_before, "parameters must stay the same objects"
    assert list(model.state_dict()) == list(reference.state_dict())

    model.eval(), reference.eval()
    with torch.no_grad():
        out, ref = run(model), run(reference)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= bound, f"eval output: rel err {rel_err(out, ref):.2e}"

    model.train(), reference.train()
    loss, ref_loss = loss_of(model), loss_of(reference)
    assert rel_err(loss, ref_loss) <= bound, f"loss {loss.item()} vs {ref_loss.item()}"
    loss.backward()
    ref_loss.backward()
    total = torch.cat([q.grad.flatten() for q in reference.parameters() if q.grad is not None]).norm().item()
    for (name, p), (ref_name, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert name == ref_name
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name}: no gradient after patching"
        if q.grad.norm().item() <= 1e-10 * total:
            # zero in exact arithmetic (an attention key bias: softmax ignores a shift that all of
            # a row's scores share), float32 leaves rounding noise: held to the bound absolutely
            assert p.grad.norm().item() <= bound * total, f"{name}.grad should be ~0, norm {p.grad.norm():.2e}"
            continue
        assert rel_err(p.grad, q.grad) <= bound, f"{name}.grad: rel err {rel_err(p.grad, q.grad):.2e}"

    model.eval()  # the training step moved BatchNorm's running statistics: a new eval output
    with torch.no_grad():
        out = run(model)
    types_before = _types(model)
    again = kiln.patch(model, ops=ops)
    assert not again.replaced and "nothing to do" in str(again), str(again)
    assert _types(model) == types_before
    with torch.no_grad():
        assert rel_err(run(model), out) == 0.0
    return report


def check_dry_run(model, expect_kinds):
    types_before = _types(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    config = getattr(getattr(model, "config", None), "_attn_implementation", None)
    report = kiln.patch(model, dry_run=True)
    assert report.dry_run and "dry run" in str(report)
    assert {r.kind for r in report.replaced} >= set(expect_kinds), str(report)
    assert _types(model) == types_before
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards
    assert getattr(getattr(model, "config", None), "_attn_implementation", None) == config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# Plain torch models.


def test_sequential_mlp_fuses_relu_into_linear(calls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(approximate="tanh"),
                          nn.LayerNorm(32), nn.Linear(32, 32), nn.SiLU(), nn.RMSNorm(32, eps=1e-6),
                          nn.Linear(32, 5), nn.Softplus())
    x = torch.randn(7, 12)
    target = torch.randint(0, 5, (7,))
    check_dry_run(model, {"linear", "activation", "layer_norm", "rms_norm"})
    report = check_patched(model, lambda m: m(_like(m, x)), lambda m: nn.functional.cross_entropy(m(_like(m, x)), target))
    assert type(model[0]) is kiln.nn.Linear and model[0].activation == "relu"
    assert type(model[1]) is nn.Identity
    assert model[2].activation == "gelu_tanh" and model[5].activation == "silu" and model[8].activation == "identity"
    assert type(model[7]) is kiln.nn.RMSNorm and model[7].offset == 0.0
    assert type(model[9]) is nn.Softplus  # not an activation linear_act has: stays
    assert any(left.path == "9" and "does not compute" in left.reason for left in report.left), str(report)
    assert report.paths("activation") == ["1", "3", "6"]
    assert calls["linear_act"] > 0 and calls["layer_norm"] > 0 and calls["rms_norm"] > 0


class _AttentionLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.lstm = nn.LSTM(16, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(24, 8, batch_first=True)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h, _ = self.lstm(h)
        h, _ = self.gru(h)
        return self.head(self.bn(h[:, -1]))


def test_multihead_attention_and_lstm_model(calls):
    torch.manual_seed(0)
    model = _AttentionLSTM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before patching: must keep working
    x = torch.randn(4, 5, 6)
    target = torch.randint(0, 3, (4,))
    # 1e-4, not 1e-5: the recurrent gradients sum over the time steps through two layers of
    # bidirectional LSTM and a GRU, and float32 rounding grows along the recurrence: torch's own
    # float32 model is 3.3e-5 from float64 on gru.bias_ih_l0 here (kiln's is 1.0e-5).
    report = check_patched(model, lambda m: m(_like(m, x)),
                           lambda m: nn.functional.cross_entropy(m(_like(m, x)), target), bound=1e-4)
    assert type(model.attn) is kiln.nn.MultiheadAttention
    assert type(model.lstm).__module__.startswith("kiln") and type(model.gru).__module__.startswith("kiln")
    assert type(model.bn) is kiln.nn.BatchNorm1d
    assert set(report.paths()) >= {"embed", "attn", "norm", "lstm", "gru", "bn", "head"}, str(report)
    assert "attn.out_proj" not in report.paths()  # read by weight inside attention, never called
    assert calls["attention"] > 0
    before = model.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.head.weight, before)


def test_ops_limits_and_validates():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 2))
    report = kiln.patch(model, ops=["layer_norm"])
    assert report.paths() == ["2"] and type(model[0]) is nn.Linear and type(model[2]) is kiln.nn.LayerNorm
    # activation without linear: reported, not fused
    report = kiln.patch(model, ops=["activation"])
    assert not report.replaced and type(model[1]) is nn.ReLU
    assert any("add 'linear'" in left.reason for left in report.left)
    report = kiln.patch(model, ops=["linear", "activation"])
    assert model[0].activation == "relu" and type(model[1]) is nn.Identity
    with pytest.raises(ValueError, match="unknown ops \\['lineer'\\]; valid ones: linear, activation"):
        kiln.patch(model, ops=["lineer"])
    with pytest.raises(TypeError, match="ops must be a list of names"):
        kiln.patch(model, ops="linear")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        kiln.patch("model")


def test_report_table_and_shared_activation():
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    report = kiln.patch(model)
    text = str(report)
    assert text.splitlines()[0] == "kiln.patch" and "module" in text and "old -> new" in text
    # one ReLU object held twice: fusing it would change the other use, so it stays
    assert type(model[1]) is nn.ReLU and model[0].activation == "identity"
    assert any("shared" in left.reason for left in report.left)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers.


def _ids(vocab, shape=(2, 11), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_gpt2(transformers, calls):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    ids = _ids(101)
    check_dry_run(model, {"conv1d", "attention", "lm_head_loss", "activation", "layer_norm"})
    report = check_patched(model, lambda m: m(ids).logits, lambda m: m(ids, labels=ids).loss)
    assert model.config._attn_implementation == "kiln"
    assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stay tied
    assert "transformer.h.0.mlp.c_fc" in report.paths("conv1d")
    assert model.transformer.h[0].mlp.c_fc.activation == "gelu_tanh"  # gelu_new fused
    assert report.paths("lm_head_loss") == ["lm_head"] and "lm_head" in str(report)
    assert calls["attention"] > 0 and calls["linear_cross_entropy"] > 0
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss is not None
    as_tuple = model(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss)


def test_gpt2_padding_mask(transformers):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    reference = copy.deepcopy(model)
    kiln.patch(model)
    ids, mask = _ids(50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: every kept query sees a key
    with torch.no_grad():
        out, ref = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    assert rel_err(out[0], ref[0]) <= F32 and rel_err(out[1, :6], ref[1, :6]) <= F32


def test_bert(transformers, calls):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config)
    ids, mask = _ids(101), torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    weights = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2))
    run = lambda m: m(ids, attention_mask=mask).last_hidden_state[mask.bool()]
    report = check_patched(model, run, lambda m: (run(m) * _like(m, weights[mask.bool()])).sum() + m(ids).pooler_output.sum())
    assert "encoder.layer.0.intermediate.dense" in report.paths("linear")
    assert model.encoder.layer[0].intermediate.dense.activation == "gelu"
    assert model.pooler.dense.activation == "tanh"
    assert calls["attention"] > 0


def test_vit_transformers(transformers, calls):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    model = transformers.ViTModel(config)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    report = check_patched(model, lambda m: m(_like(m, x)).last_hidden_state, lambda m: m(_like(m, x)).pooler_output.square().sum())
    assert "embeddings.patch_embeddings.projection" in report.paths("conv2d")
    assert calls["attention"] > 0


def _llama(transformers, vocab=101):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attention_dropout=0.0)
    return transformers.LlamaForCausalLM(config)


def test_llama(transformers, calls):
    torch.manual_seed(0)
    model = _llama(transformers)
    ids = _ids(101)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored, as Hugging Face's loss ignores them
    check_dry_run(model, {"rms_norm", "gated_mlp", "rotary", "attention", "lm_head_loss"})
    report = check_patched(model, lambda m: m(ids).logits, lambda m: m(ids, labels=labels).loss)
    for kind, path in (("rms_norm", "model.layers.0.input_layernorm"), ("rms_norm", "model.norm"),
                       ("gated_mlp", "model.layers.1.mlp"), ("rotary", "model.layers.0.self_attn"),
                       ("lm_head_loss", "lm_head")):
        assert path in report.paths(kind), (kind, path, str(report))
    for op in ("attention", "rotary_embedding", "swiglu", "linear_cross_entropy", "rms_norm"):
        assert calls.get(op, 0) > 0, op
    # the rotary forward is this instance's own: the class and other models keep Hugging Face's
    other = _llama(transformers)
    assert "forward" not in other.model.layers[0].self_attn.__dict__
    assert other.config._attn_implementation != "kiln"
    out = model(ids, labels=labels)
    assert out.logits is None
    assert model(ids).logits.shape == (2, 11, 101)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_with_cache_matches(transformers, family):
    """Decoding through the KV cache (one query against many keys, no mask): the same tokens."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2,
                                                                     n_positions=32))
    else:
        model = _llama(transformers, vocab=60)
    model.eval()
    reference = copy.deepcopy(model)
    kiln.patch(model)
    prompt = _ids(60, (2, 5))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))


def test_llama_num_items_in_batch(transformers):
    torch.manual_seed(0)
    model = _llama(transformers)
    reference = copy.deepcopy(model)
    kiln.patch(model, ops=["lm_head_loss"])
    ids = _ids(101)
    n = torch.tensor(7)
    assert rel_err(model(ids, labels=ids, num_items_in_batch=n).loss,
                   reference(ids, labels=ids, num_items_in_batch=n).loss) <= F32


def test_llama_ops_limits(transformers):
    model = _llama(transformers)
    report = kiln.patch(model, ops=["rms_norm"])
    assert {r.kind for r in report.replaced} == {"rms_norm"}
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear
    assert model.config._attn_implementation != "kiln"


# ---------------------------------------------------------------------------------------------
# timm.


def test_timm_resnet(timm, calls):
    torch.manual_seed(0)
    from timm.models.resnet import BasicBlock, ResNet

    # resnet18's blocks, one per stage, on 4 images of 64 x 64: every BatchNorm of the training
    # step sees >= 16 values per channel. (resnet18 on 2 images of 32 x 32 normalises 2 values
    # per channel in its last stage, so ill-conditioned that torch's own float32 gradients are
    # 4e-4 from float64.)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 7, 0, 3])
    report = check_patched(model, lambda m: m(_like(m, x)), lambda m: nn.functional.cross_entropy(m(_like(m, x)), target))
    assert "conv1" in report.paths("conv2d") and "bn1" in report.paths("batch_norm") and "fc" in report.paths()
    assert calls["batch_norm"] > 0


def test_timm_vit(timm, calls):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([3, 0])
    report = check_patched(model, lambda m: m(_like(m, x)), lambda m: nn.functional.cross_entropy(m(_like(m, x)), target))
    assert "blocks.0.attn" in report.paths("attention") and "blocks.1.mlp.act" in report.paths("activation")
    assert model.blocks[0].mlp.fc1.activation == "gelu"
    assert calls["attention"] > 0


@pytest.mark.gpu
def test_llama_cuda(transformers):
    torch.manual_seed(0)
    model = _llama(transformers).cuda()
    ids = _ids(101).cuda()
    check_patched(model, lambda m: m(ids).logits, lambda m: m(ids, labels=ids).loss, bound=1e-3)
