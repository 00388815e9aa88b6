"""The GPU code paths, run on the CPU: bf16 autocast against fp32, the variable-length attention
path with a pure-PyTorch stand-in for flash-attn's kernel, the weights cast once for inference,
and the refusal of bf16 on a GPU without it."""
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import diffusion
import model as dit
from model import DiT, DiTConfig, PrecisionError, set_runtime, unpad

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

from test_model import LENGTHS, batch as padded_batch  # noqa: F401 (a fixture)

CFG = DiTConfig(vocab_size=64, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)


def varlen_standin(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_qkvpacked_func's contract in plain PyTorch: qkv [T, 3, H, D] of B sequences
    packed back to back, cu_seqlens int32 [B + 1] their offsets, max_seqlen an int -> [T, H, D]."""
    assert qkv.dim() == 4 and qkv.shape[1] == 3, qkv.shape
    assert cu_seqlens.dtype == torch.int32 and isinstance(max_seqlen, int) and not causal and dropout_p == 0.0
    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == len(qkv) and max(b - a for a, b in zip(bounds, bounds[1:])) == max_seqlen
    out = []
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = (a.transpose(0, 1) for a in qkv[start:end].unbind(1))  # each [H, n, D]
        out.append(F.scaled_dot_product_attention(q, k, v, scale=softmax_scale).transpose(0, 1))
    return torch.cat(out)


def random_model(seed=0, scale=0.1, **runtime):
    """DiT(CFG) with every weight moved by N(0, scale^2) (the adaLN-Zero init makes every block the
    identity: randomised, the tests can fail). 0.1 keeps it in a trained model's regime (logits ~0.6);
    0.3 makes a chaotic network whose outputs amplify any rounding difference (logits ~6)."""
    torch.manual_seed(seed)
    model = DiT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    for k, v in runtime.items():
        setattr(model, k, v)
    return model


@pytest.fixture
def batch(padded_batch):
    """test_model's padded batch, with times and masked positions."""
    x, attention_mask = padded_batch
    t = torch.tensor([0.3, 0.6, 0.9])
    masked = diffusion.mask_positions(t, attention_mask, torch.Generator().manual_seed(2))
    return x, attention_mask, t, masked


def test_unpad_packs_the_real_tokens_and_gathers_nothing_without_padding():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    indices, cu_seqlens, max_seqlen = unpad(mask, 2, 3, "cpu")
    assert indices.tolist() == [0, 1, 2, 3] and cu_seqlens.tolist() == [0, 3, 4] and max_seqlen == 3
    assert cu_seqlens.dtype == torch.int32
    indices, cu_seqlens, max_seqlen = unpad(None, 2, 3, "cpu")
    assert indices is None and cu_seqlens.tolist() == [0, 3, 6] and max_seqlen == 3


def test_varlen_path_equals_sdpa_and_each_sequence_alone(batch):
    x, attention_mask, t, _ = batch
    sdpa, varlen = random_model(), random_model(varlen_kernel=varlen_standin)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    with torch.no_grad(), mock.patch.object(dit, "unpad", wraps=dit.unpad) as spy:
        packed = varlen(x, sigma, attention_mask)
        assert spy.call_count == 1  # once per forward, not once per block
        torch.testing.assert_close(packed[attention_mask], sdpa(x, sigma, attention_mask)[attention_mask], atol=1e-5, rtol=1e-5)
        for i, n in enumerate(LENGTHS):
            torch.testing.assert_close(packed[i, :n], varlen(x[i:i + 1, :n], sigma[i:i + 1])[0], atol=1e-5, rtol=1e-5)
        x2 = x.clone()
        x2[~attention_mask] = 17  # padding content never matters
        torch.testing.assert_close(varlen(x2, sigma, attention_mask)[attention_mask], packed[attention_mask])


def test_varlen_path_gives_the_gradients_of_sdpa(batch):
    x, attention_mask, t, masked = batch
    grads = []
    for kernel in (None, varlen_standin):
        model = random_model(varlen_kernel=kernel).train()
        diffusion.nelbo(model, x, t, masked, attention_mask).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)


def test_attention_mask_must_be_bool(batch):
    x, attention_mask, _, _ = batch
    with pytest.raises(AssertionError, match="bool"):
        random_model()(x, torch.zeros(3), attention_mask.long())


# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%). Tolerances: about 3x the largest
# deviation measured on these inputs (printed in each assertion's message when it fails).
@torch.no_grad()
def test_bf16_autocast_on_cpu_matches_fp32(batch):
    x, attention_mask, t, masked = batch
    fp32, bf16 = random_model(), random_model(precision="bf16")
    sigma = torch.zeros(3)
    a, b = fp32(x, sigma, attention_mask)[attention_mask], bf16(x, sigma, attention_mask)[attention_mask]
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # bf16 really ran, and the output is float32
    torch.testing.assert_close(b, a, atol=0.05, rtol=0)  # measured: 0.014 (logits' std 0.6)
    n32, n16 = diffusion.nelbo(fp32, x, t, masked, attention_mask), diffusion.nelbo(bf16, x, t, masked, attention_mask)
    torch.testing.assert_close(n16, n32, rtol=3e-3, atol=0)
    cast = set_runtime(random_model(), "bf16", inference=True)  # weights cast once: the same numbers
    assert cast.blocks[0].attn_qkv.weight.dtype == torch.bfloat16 and cast.vocab_embed.embedding.dtype == torch.float32
    torch.testing.assert_close(diffusion.nelbo(cast, x, t, masked, attention_mask), n32, rtol=3e-3, atol=0)


@torch.no_grad()
def test_adaptive_head_under_bf16_stays_float32(batch):
    """The adaptive head runs in fp32 under autocast (its clusters' log-softmaxes are combined in one
    fp32 buffer) and keeps fp32 weights when the model is cast for inference."""
    x, attention_mask, t, masked = batch
    cfg = DiTConfig(**{**CFG.__dict__, "adaptive_head": 4})
    models = []
    for runtime in ({}, {"precision": "bf16"}, "cast"):
        torch.manual_seed(0)
        m = DiT(cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        if runtime == "cast":
            set_runtime(m, "bf16", inference=True)
            assert m.output_layer.adaptive.head.weight.dtype == torch.float32 and m.blocks[0].attn_out.weight.dtype == torch.bfloat16
        else:
            for k, v in runtime.items():
                setattr(m, k, v)
        models.append(m)
    n32 = diffusion.nelbo(models[0], x, t, masked, attention_mask)
    for m in models[1:]:
        torch.testing.assert_close(diffusion.nelbo(m, x, t, masked, attention_mask), n32, rtol=3e-3, atol=0)
        log_p = m(x, torch.zeros(3), attention_mask)[attention_mask][:, :-1].double().exp().sum(-1)
        torch.testing.assert_close(log_p, torch.ones_like(log_p), atol=1e-5, rtol=0)


def test_one_bf16_training_step_on_cpu_matches_fp32(batch):
    """The loss and every parameter's gradient of a bf16 training step agree with fp32's."""
    x, attention_mask, t, masked = batch
    grads, losses = [], []
    for precision in ("fp32", "bf16"):
        model = random_model(precision=precision).train()
        loss = diffusion.nelbo(model, x, t, masked, attention_mask).sum() / attention_mask.sum()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=3e-3)
    for name, g in grads[0].items():
        err = float((grads[1][name] - g).norm() / g.norm())
        assert err < 0.05, f"{name}: relative gradient error {err:.3f}"


def test_runtime_choice():
    model = random_model()
    assert set_runtime(model).precision == "fp32" and model.varlen_kernel is None  # CPU: auto = fp32, SDPA
    with pytest.raises(ValueError, match="precision 'half'"):
        set_runtime(model, "half")
    # a GPU without bf16 (V100, T4): auto and bf16 are refused with the alternatives named
    gpu = types.SimpleNamespace(parameters=lambda: iter([types.SimpleNamespace(is_cuda=True)]))
    with mock.patch.object(torch.cuda, "is_bf16_supported", return_value=False), \
            mock.patch.object(torch.cuda, "get_device_name", return_value="Tesla V100"):
        with pytest.raises(PrecisionError, match="Tesla V100.*has no bf16; pass --precision fp16.*or fp32"):
            set_runtime(gpu, "bf16")
        assert set_runtime(gpu, "fp16").precision == "fp16"
        assert set_runtime(gpu, "auto").precision == "fp32"  # auto takes what the GPU can run
    with mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True):
        assert set_runtime(gpu, "auto").precision == "bf16"  # as the reference trains
