"""Static W8A8: the input quantizer (native kernel against its reference), the int8 linear
against exact integer arithmetic, smoothing, the activation calibrations (min-max,
percentile, KL histogram), the checkpoint round trip, the default model end to end, and the
errors a user can reach."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from surge.errors import ModelFormatError
from surge.layers.quantization import w8a8_linear
from surge.layers.native import native_ops, w8a8_ops
from surge.layers.quantization.w8a8_linear import W8A8Linear, onednn_int8
from surge.loader import load_model
from surge.quant.activations import (
    histogram,
    input_scale,
    kl_bins,
    percentile_bins,
    smoothing_factors,
)
from surge.layers.quantization.formats import W8A8Weight, quantize_activations
from surge.quant.quantize import (
    QuantizeOptions,
    quantize_model,
)
from tests.conftest import CORPUS, build_tiny_model
from tests.helpers import (
    assert_quantize_cli_refuses,
    assert_saved_equals_memory,
    surge_logits,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TEXT = DATA / "gpl-3.0.txt"
CALIB = DATA / "apache-2.0.txt"


def _w8a8(n: int = 96, k: int = 80, seed: int = 0) -> W8A8Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return W8A8Weight(q, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.tensor(0.03),
                      torch.rand(k, generator=g) + 0.5)


# ---- the input quantizer and the int8 linear ------------------------------------------------

@pytest.mark.skipif(native_ops() is None, reason="native kernels not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_quantizer_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 83, generator=g) * 4).to(dtype)  # 83: a vector body and a scalar tail
    inv = torch.rand(83, generator=g) * 60
    x[0, :10] = torch.arange(10) + 0.5  # exact ties with inv = 1: half to even, as torch.round
    inv[:10] = 1
    x[1, :3] = torch.tensor([1e4, -1e4, 0.0])  # clamped to +-127
    for rows in (x, x[:, :50]):  # contiguous, and rows with a stride
        cols = rows.shape[1]
        ref = (quantize_activations(rows, inv[:cols]).to(torch.int16) + 128).to(torch.uint8)
        assert torch.equal(torch.ops.surge_native.quantize_u8(rows, inv[:cols]), ref)
    codes = quantize_activations(x, inv)
    assert codes[0, :10].tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 8, 10] and codes[1, :3].tolist() == [127, -127, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("kernel", ["surge", "oneDNN", "torch._int_mm"])
def test_w8a8_linear_is_exact_integer_arithmetic(monkeypatch, dtype, rows, kernel):
    """y = input_scale scale[n] sum_k codes[m, k] q[n, k] + b, on each kernel."""
    if kernel == "surge" and w8a8_ops() is None:
        pytest.skip("surge's W8A8 kernel needs AVX-512 VNNI and BF16")
    if kernel == "oneDNN" and not onednn_int8():
        pytest.skip("no oneDNN int8 kernels in this build, or no VNNI (where they saturate)")
    if kernel != "surge":
        monkeypatch.setattr(w8a8_linear, "w8a8_ops", lambda: None)
    if kernel == "torch._int_mm":
        monkeypatch.setattr(w8a8_linear, "onednn_int8", lambda: False)
    w, bias = _w8a8(n=128), torch.randn(128)
    layer = W8A8Linear(w, bias, dtype)
    assert layer.kernel == kernel
    x = (torch.randn(rows, 80) * 2).to(dtype)
    codes = quantize_activations(x, w.act_inv()).double()
    ref = float(w.input_scale) * w.scale.double() * (codes @ w.q.double().t()) + bias.to(dtype).double()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, 128)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert torch.equal(layer(x.reshape(1, rows, 80)).reshape(rows, 128), y)  # any leading shape


@pytest.mark.parametrize("kernel", ["surge", "oneDNN"])
def test_w8a8_linear_compiles_without_graph_breaks(monkeypatch, kernel):
    """The kernels are opaque ops: a compiled layer gives the eager layer's bits."""
    if kernel == "surge" and w8a8_ops() is None:
        pytest.skip("surge's W8A8 kernel needs AVX-512 VNNI and BF16")
    if kernel == "oneDNN" and not onednn_int8():
        pytest.skip("no oneDNN int8 kernels in this build, or no VNNI (where they saturate)")
    if kernel == "oneDNN":
        monkeypatch.setattr(w8a8_linear, "w8a8_ops", lambda: None)
    layer = W8A8Linear(_w8a8(n=128), torch.randn(128), torch.bfloat16)
    assert layer.kernel == kernel
    x = torch.randn(5, 80).bfloat16()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_w8a8_weight_dequantize_and_cat():
    w = _w8a8()
    x = torch.randn(4, 80)
    assert torch.allclose(x @ w.dequantize().t(), (x / w.smooth) @ (w.q.float() * w.scale[:, None]).t(), atol=1e-5)
    both = W8A8Weight.cat([w, W8A8Weight(w.q[:8], w.scale[:8], w.input_scale, w.smooth)])
    assert both.q.shape == (104, 80) and torch.equal(both.smooth, w.smooth)
    other = W8A8Weight(w.q, w.scale, torch.tensor(0.5), w.smooth)
    with pytest.raises(ModelFormatError, match="different input scales or smoothing factors"):
        W8A8Weight.cat([w, other])


# ---- smoothing and the activation calibrations ----------------------------------------------

def test_smoothing_preserves_the_product_and_tames_outlier_channels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g)
    x[:, 5] *= 40  # an outlier channel, as LLM activations have
    w = torch.randn(48, 64, generator=g) * 0.05
    cmax = x.abs().amax(0)
    assert torch.equal(smoothing_factors(cmax, w, 0.0), torch.ones(64))
    s = smoothing_factors(cmax, w, 0.8)
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-4)
    dead = cmax.clone()
    dead[7] = 0
    assert smoothing_factors(dead, w, 0.8)[7] == 1

    def w8a8_error(alpha: float) -> float:
        s = smoothing_factors(cmax, w, alpha)
        ws = w * s
        wscale = ws.abs().amax(1) / 127
        a = float((x / s).abs().max()) / 127
        weight = W8A8Weight(torch.round(ws / wscale[:, None]).to(torch.int8), wscale, torch.tensor(a), s)
        y = W8A8Linear(weight, None, torch.float32)(x)
        return float((y - x @ w.t()).pow(2).mean() / (x @ w.t()).pow(2).mean())

    assert w8a8_error(0.8) < 0.2 * w8a8_error(0.0)


def _naive_kl_bins(h: torch.Tensor, levels: int) -> int:
    """The definition, one candidate at a time."""
    h = h.double()
    best, best_i = math.inf, len(h)
    for i in range(levels, len(h) + 1):
        p = h[:i].clone()
        p[-1] += h[i:].sum()
        q = torch.zeros(i, dtype=torch.float64)
        for r in range(levels):
            a, b = r * i // levels, (r + 1) * i // levels
            filled = h[a:b] > 0
            if filled.any():
                q[a:b] = torch.where(filled, h[a:b].sum() / filled.sum(), 0.0)
        p, q = p / p.sum(), q / q.sum()
        holes = (q == 0) & (p > 0)
        q = torch.where(holes, 1e-4, q * (1 - 1e-4 * holes.sum()))
        kl = float((p[p > 0] * torch.log(p[p > 0] / q[p > 0])).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_kl_calibration():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(200_000, generator=g)
    top = float(normal.abs().max())
    h = histogram(normal, top, 512)
    assert h.sum() == 200_000
    assert kl_bins(h, 32) == _naive_kl_bins(h, 32)
    assert kl_bins(h) == _naive_kl_bins(h, 128)
    # a Gaussian is clipped around 4 sigma (TensorRT reports the same); a uniform one not at all
    threshold = top * kl_bins(histogram(normal, top)) / 2048
    assert 3.0 < threshold < 4.6 and threshold < 0.95 * top
    uniform = torch.rand(200_000, generator=g) * 2 - 1
    assert kl_bins(histogram(uniform, 1.0)) == 2048


def test_percentile_and_minmax_scales():
    x = torch.cat([torch.linspace(0, 1, 9_999), torch.tensor([50.0])])
    h = histogram(x, 50.0)
    assert h.sum() == 10_000
    assert input_scale("minmax", None, 50.0, 99.99) == pytest.approx(50 / 127)
    assert percentile_bins(h, 100) == 2048
    # 99.9% of the values are below 1.0: the first 41 bins of width 50/2048 hold them
    assert percentile_bins(h, 99.9) == 41
    assert float(input_scale("percentile", h, 50.0, 99.9)) == pytest.approx(50 * 41 / 2048 / 127)
    # KL clips the lone outlier as far as it can: to its smallest candidate, 128 bins
    assert float(input_scale("kl", h, 50.0, 99.9)) == pytest.approx(50 * 128 / 2048 / 127)


# ---- quantize, save, load ---------------------------------------------------------------------

MIXED = """\
default = "w8a8"
[modules]
"*.mlp.down_proj" = "int8"
"lm_head" = "bf16"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("w8a8_tiny"), tiny_tokenizer_dir)


@pytest.mark.parametrize("act_method, method", [("minmax", "rtn"), ("percentile", "mse"), ("kl", "gptq")])
def test_round_trip_logits_identical(tmp_path, tiny, act_method, method):
    from safetensors import safe_open

    (tmp_path / "policy.toml").write_text(MIXED)
    (tmp_path / "calib.txt").write_text(CORPUS)
    opts = QuantizeOptions(method=method, policy=str(tmp_path / "policy.toml"), calib=str(tmp_path / "calib.txt"),
                           ctx=64, progress=False, act_method=act_method)
    result = quantize_model(str(tiny), str(tmp_path / "out"), opts)
    assert result.scheme_counts == {"w8a8": 12, "int8": 2, "bf16": 2}  # LM head and embedding
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["activations"]["method"] == act_method and config["modules"]["model.layers.0.self_attn.q_proj"] == "w8a8"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        q_scale = f.get_tensor("model.layers.0.self_attn.q_proj.input_scale")
        assert torch.equal(q_scale, f.get_tensor("model.layers.0.self_attn.v_proj.input_scale"))  # one input
        assert f.get_tensor("model.layers.0.mlp.up_proj.smooth").shape == (64,)
        assert "model.layers.0.mlp.down_proj.input_scale" not in f.keys()  # noqa: SIM118 - safe_open is no dict
    src, seq, saved = assert_saved_equals_memory(str(tiny), str(tmp_path / "out"), opts, CORPUS)
    assert saved.quantization == "int8 (2 linears), w8a8 (6 linears)"
    # the quantized model is close to the float one; -q none runs its weights without rounding inputs
    (ref,) = surge_logits(src, [seq])
    (quant,) = surge_logits(load_model(str(tmp_path / "out"), "float32", "cpu"), [seq])
    (weights_only,) = surge_logits(load_model(str(tmp_path / "out"), "float32", "cpu", "none"), [seq])
    assert (quant.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert (weights_only.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_checkpoint_errors(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    (tmp_path / "calib.txt").write_text(CORPUS)
    out = tmp_path / "q"
    quantize_model(str(tiny), str(out), QuantizeOptions("w8a8", calib=str(tmp_path / "calib.txt"), ctx=64,
                                                        progress=False))
    good = load_file(out / "model.safetensors")

    def load_with(change) -> None:
        tensors = dict(good)
        change(tensors)
        save_file(tensors, out / "model.safetensors")
        load_model(str(out), "float32")

    with pytest.raises(ModelFormatError, match="w8a8 module model.layers.0.self_attn.k_proj has no tensor "
                                               "model.layers.0.self_attn.k_proj.smooth"):
        load_with(lambda t: t.pop("model.layers.0.self_attn.k_proj.smooth"))
    with pytest.raises(ModelFormatError, match="input_scale must be one positive number"):
        load_with(lambda t: t.update({"model.layers.1.mlp.down_proj.input_scale": torch.tensor([-1.0])}))
    with pytest.raises(ModelFormatError, match="different input scales or smoothing factors"):
        load_with(lambda t: t.update({"model.layers.1.mlp.up_proj.input_scale": torch.tensor([0.5])}))


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "w8a8"], "w8a8 needs calibration text for its activation scales"),
    (["--scheme", "int8", "--policy", "w8a8.toml"], "w8a8 needs calibration text"),
    (["--scheme", "w8a8", "--calib", "calib.txt", "--act-method", "entropy"], "invalid choice: 'entropy'"),
    (["--scheme", "w8a8", "--calib", "calib.txt", "--smooth-alpha", "1.5"], "smoothing alpha must be in [0, 1]"),
    (["--scheme", "w8a8", "--calib", "calib.txt", "--act-method", "percentile", "--act-percentile", "20"],
     "activation percentile must be in (50, 100]"),
    (["--scheme", "w8a8", "--calib", "short.txt"], "tokens; at least 128 are needed"),
])
def test_cli_errors(tmp_path, tiny, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text(CORPUS)
    (tmp_path / "short.txt").write_text("The quick fox")
    (tmp_path / "w8a8.toml").write_text('[modules]\n"*.mlp.*" = "w8a8"\n')
    assert_quantize_cli_refuses(tmp_path, tiny, capsys, argv, message)


# ---- the default model ------------------------------------------------------------------------

def test_default_model_end_to_end(tmp_path, capsys):
    """surge quantize --scheme w8a8 on the default model, calibrated on one text and scored on
    another (measured: +2.8% perplexity with smoothing; +130% without), then LLM(DIR) serves it:
    its greedy tokens are the loaded checkpoint's."""
    from surge import LLM, SamplingParams
    from surge.entrypoints.cli import main

    out = tmp_path / "smol-w8a8"
    assert main(["quantize", "--scheme", "w8a8", "--calib", str(CALIB), "--eval-text", str(TEXT),
                 "--eval-tokens", "2048", "--json", "--no-progress", "-o", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scheme_counts"] == {"w8a8": 210, "int8-g32": 1, "bf16": 1}
    quality = result["quality"]
    assert quality["delta_ppl_pct"] < 5 and quality["top1_agreement"] > 0.85, quality
    llm = LLM(str(out), dtype="bfloat16", kv_cache_memory=64 << 20)
    assert "w8a8 (120 linears)" in llm.engine.model_info.quantization
    prompt = llm.engine.tokenizer.encode("The capital of France is")
    got = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    loaded = load_model(str(out), "bfloat16", "cpu")
    expected: list[int] = []
    for _ in range(8):
        (logits,) = surge_logits(loaded, [prompt + expected])
        expected.append(int(logits[-1].argmax()))
    assert got.token_ids == expected
