"""`surge quantize`: a float (or GGUF, dequantized) checkpoint -> a quantized surge checkpoint.

    load float32 -> schemes per module (policy) -> calibration statistics (gptq, mse with --calib)
    -> each module quantized (rtn | percentile | mse | gptq) -> safetensors + config + tokenizer
    -> quality of the result against the float model (perplexity, KL divergence, top-1)

GPTQ here takes every layer's statistics from the float model in one pass (not layer by layer
from the already-quantized prefix); its group grids come from the MSE clipping search
(measured on the default model: min-max grids +26.9% perplexity, MSE grids +8.5%, RTN +34.3%).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surge.errors import InvalidArgumentError
from surge.quant.activations import (
    DEFAULT_ACT_METHOD,
    DEFAULT_ACT_PERCENTILE,
    DEFAULT_SMOOTH_ALPHA,
    check_act_options,
)
from surge.loader.quantized_checkpoint import FORMAT_VERSION, QUANT_METHOD
from surge.quant.checkpoint import (
    WEIGHTS_FILE,
    hf_config,
    quantized_tensors,
    write_checkpoint,
)
from surge.quant.evaluate import (
    CompareResult,
    WindowRunner,
    compare,
    plan_windows,
    read_text,
    tokenize_text,
)
from surge.layers.quantization.formats import Int8Weight, QuantizedWeight, W8A8Weight, split_rows
from surge.quant.gptq import DEFAULT_DAMP, gptq
from surge.quant.grid import DEFAULT_PERCENTILE, quantize_weight
from surge.quant.policy import (
    EMBEDDING,
    Policy,
    checkpoint_names,
    load_policy,
    resolve_policy,
)
from surge.layers.quantization.schemes import Scheme, check_method, parse_scheme

logger = logging.getLogger(__name__)

CALIBRATED = ("gptq", "mse")  # methods that use calibration statistics (mse without them: plain MSE)


@dataclass
class QuantizeOptions:
    scheme: str | None = None  # the default scheme (a policy's 'default' wins)
    method: str = "rtn"
    calib: str | None = None
    policy: str | None = None
    act_order: bool = False
    damp: float = DEFAULT_DAMP
    percentile: float = DEFAULT_PERCENTILE
    ctx: int = 512  # tokens per calibration / evaluation window
    calib_tokens: int | None = None  # use at most this many tokens of the calibration text
    eval_text: str | None = None  # default: the calibration text, if any
    eval_tokens: int | None = 4096
    progress: bool = True
    # w8a8: how its inputs' static scales are calibrated (surge/quant/activations.py)
    act_method: str = DEFAULT_ACT_METHOD
    act_percentile: float = DEFAULT_ACT_PERCENTILE
    smooth_alpha: float = DEFAULT_SMOOTH_ALPHA


@dataclass
class QuantizeResult:
    output: str
    scheme_counts: dict[str, int]  # scheme -> number of checkpoint modules (linears and embedding)
    scheme_bytes: dict[str, int]  # scheme -> stored bytes of those modules
    file_bytes: int  # the safetensors file
    bf16_bytes: int  # the same model in bf16
    calibration_tokens: int
    quality: CompareResult | None
    eval_text: str | None
    seconds: float
    schemes: dict[str, str] = field(default_factory=dict)  # module path -> scheme


def check_options(opts: QuantizeOptions, output: str) -> tuple[Policy, str | None, str | None]:
    """Everything checkable before the model loads: scheme, method, files, output directory."""
    if opts.scheme is not None:
        parse_scheme(opts.scheme)
    check_method(opts.method)
    policy = load_policy(opts.policy) if opts.policy else Policy()
    if opts.scheme is None and policy.default is None:
        raise InvalidArgumentError("no scheme: pass --scheme (e.g. int4-g64) or give the policy a 'default'")
    if opts.method == "gptq" and not opts.calib:
        raise InvalidArgumentError("--method gptq needs calibration text: pass --calib FILE")
    check_act_options(opts.act_method, opts.act_percentile, opts.smooth_alpha)
    named = [opts.scheme, policy.default, *(scheme for _, scheme in policy.rules)]
    if not opts.calib and any(n is not None and parse_scheme(n).activations_quantized for n in named):
        raise InvalidArgumentError("w8a8 needs calibration text for its activation scales: pass --calib FILE")
    calib = read_text(opts.calib, "calibration") if opts.calib else None
    eval_text = read_text(opts.eval_text, "evaluation text") if opts.eval_text else calib
    if opts.ctx < 2:
        raise InvalidArgumentError(f"ctx must be at least 2 tokens, got {opts.ctx}")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise InvalidArgumentError(f"output {output} exists and is not an empty directory; name a new one")
    return policy, calib, eval_text


def quantize_weights(loaded: Any, schemes: dict[str, Scheme], opts: QuantizeOptions,
                     calib_ids: list[int] | None) -> tuple[dict[str, QuantizedWeight | torch.Tensor], int]:
    """Module path -> its quantized weight (or its float weight in the scheme's dtype), and the
    calibration tokens used."""
    from surge.quant.activations import input_quantizers
    from surge.quant.calibration import calibrate

    net = loaded.model
    linears = {p: m for p, m in net.named_modules() if isinstance(m, nn.Linear)}
    quantized = {p: linears[p] for p, s in schemes.items() if s.quantized}
    w8a8 = [p for p, s in schemes.items() if s.activations_quantized]
    stats, quantizers = None, {}
    hessians = list(quantized) if opts.method in CALIBRATED else []
    if calib_ids is not None and (hessians or w8a8):
        runner = WindowRunner(loaded, opts.ctx)
        stats = calibrate(runner, calib_ids, quantized, opts.progress, hessians, w8a8)
        if w8a8:
            quantizers = input_quantizers(runner, calib_ids, linears, stats.channel_max, opts.act_method,
                                          opts.act_percentile, opts.smooth_alpha, opts.progress)
    out: dict[str, QuantizedWeight | torch.Tensor] = {}
    items = list(schemes.items())
    if opts.progress:
        from tqdm import tqdm

        items = tqdm(items, desc="quantizing", unit="module", file=sys.stderr, leave=False)
    for path, scheme in items:
        if path == EMBEDDING:
            out[path] = net.model.embed_tokens.weight.detach().to(scheme.dtype)
            continue
        w = linears[path].weight.detach().float()
        if not scheme.quantized:
            out[path] = w.to(scheme.dtype)
            continue
        # w8a8: the weight is quantized on the smoothed inputs x / smooth, whose statistics
        # are H / (smooth smooth^T)
        smooth = quantizers[path][0] if path in quantizers else torch.ones(w.shape[1])
        w = w * smooth
        hessian = None
        if stats is not None and path in stats.hessians:
            hessian = stats.hessian(path) / torch.outer(smooth, smooth)
        if opts.method == "gptq":
            assert hessian is not None
            q = gptq(w, hessian, scheme.weight_scheme, opts.act_order, opts.damp, "mse", opts.percentile, path)
        else:
            importance = torch.diagonal(hessian) if hessian is not None else None
            q = quantize_weight(w, scheme.weight_scheme, opts.method, importance, opts.percentile, path)
        if path in quantizers:
            assert isinstance(q, Int8Weight)
            q = W8A8Weight(q.q, q.scale, quantizers[path][1], smooth)
        out[path] = q
    return out, stats.tokens if stats is not None else 0


def install(weights: dict[str, QuantizedWeight | torch.Tensor]) -> Callable[[nn.Module], None]:
    """A load_model before_finalize hook that puts `weights` into a freshly loaded model, so it
    runs exactly what the saved checkpoint will (float weights through the scheme's dtype)."""
    def hook(net: nn.Module, pending: dict[str, dict[int, QuantizedWeight]]) -> None:
        pending.clear()  # the file's own quantized weights (a GGUF's) give way to these
        with torch.no_grad():
            for path, w in weights.items():
                if path == EMBEDDING:
                    net.model.embed_tokens.weight.copy_(w)  # type: ignore[union-attr]
                elif isinstance(w, torch.Tensor):
                    net.get_submodule(path).weight.copy_(w)
                else:
                    pending[path] = {0: w}
    return hook


def checkpoint_tensors(loaded: Any, weights: dict[str, QuantizedWeight | torch.Tensor],
                       schemes: dict[str, Scheme]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store under the checkpoint's names, and module name -> scheme."""
    net = loaded.model
    tied = loaded.config.tie_word_embeddings
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, str] = {}
    linears = {p: m for p, m in net.named_modules() if isinstance(m, nn.Linear)}
    for path, module in linears.items():
        scheme = schemes[path]
        if path == "lm_head" and tied and not scheme.quantized:
            continue  # the embedding table itself
        names = checkpoint_names(path)
        sizes = net.shard_sizes(f"{path}.weight") if len(names) > 1 else [module.out_features]
        bias = split_rows(module.bias.detach().float(), sizes) if module.bias is not None else [None] * len(names)
        for name, piece, b in zip(names, split_rows(weights[path], sizes), bias):
            modules[name] = scheme.name
            if isinstance(piece, torch.Tensor):
                tensors[f"{name}.weight"] = piece.clone()
            else:
                tensors.update(quantized_tensors(name, piece))  # type: ignore[arg-type]
            if b is not None:
                tensors[f"{name}.bias"] = b.clone()
    modules[EMBEDDING] = schemes[EMBEDDING].name
    tensors[f"{EMBEDDING}.weight"] = weights[EMBEDDING].clone()  # type: ignore[union-attr]
    skip = {f"{p}.{k}" for p in linears for k in ("weight", "bias")} | {f"{EMBEDDING}.weight"}
    for name, param in net.named_parameters():
        if name not in skip:
            tensors[name] = param.detach().float().clone()  # norms: small, kept exact
    rotary = getattr(net.model, "rotary", None)  # a family with learned positions (GPT-2) has none
    factors = rotary.frequency_factors if rotary is not None else None
    if factors is not None:
        tensors["model.rope_freqs"] = factors.clone()
    return tensors, modules


def save_quantized(loaded: Any, weights: dict[str, QuantizedWeight | torch.Tensor], schemes: dict[str, Scheme],
                   output: str, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Write the checkpoint into `output` (new or empty): written whole in a staging directory
    beside it, then moved into place, so a failure leaves no half checkpoint."""
    tensors, modules = checkpoint_tensors(loaded, weights, schemes)
    qconfig = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
               **{k: v for k, v in meta.items() if v is not None}, "modules": modules}
    config = hf_config(loaded.config, str(schemes[EMBEDDING].dtype).removeprefix("torch."), qconfig)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".surge-quantize-", dir=parent)
    try:
        write_checkpoint(staging, tensors, config, loaded.tokenizer)
        _default_permissions(staging)
        if os.path.isdir(output):
            os.rmdir(output)  # checked empty
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return tensors, modules


def _default_permissions(directory: str) -> None:
    """mkdtemp makes a private directory; the checkpoint gets the permissions the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def quantize_model(model: str | None, output: str, opts: QuantizeOptions) -> QuantizeResult:
    from surge.loader import load_model

    start = time.perf_counter()
    policy, calib_text, eval_text = check_options(opts, output)
    loaded = load_model(model, "float32", "cpu", "none")
    if loaded.config.num_experts:
        raise InvalidArgumentError(
            f"{model}: surge quantize does not write mixture-of-experts checkpoints; serve the model with "
            "-q int4 or -q int8, which quantize every expert at load")
    schemes = resolve_policy(loaded.model, policy, opts.scheme)
    calib_ids = tokenize_text(loaded, calib_text, opts.calib_tokens) if calib_text is not None else None
    eval_ids = tokenize_text(loaded, eval_text, opts.eval_tokens) if eval_text is not None else None
    if eval_ids is not None:
        plan_windows(len(eval_ids), opts.ctx)  # a text too short to score fails before any work
    w8a8 = any(s.activations_quantized for s in schemes.values())
    if calib_ids is not None and opts.method not in CALIBRATED and not w8a8:
        logger.warning("--method %s does not use calibration text; --calib only sets the evaluation text", opts.method)
    weights, calib_tokens = quantize_weights(loaded, schemes, opts, calib_ids)

    meta = {"scheme": policy.default or opts.scheme, "method": opts.method,
            "act_order": opts.act_order if opts.method == "gptq" else None,
            "calibration": {"file": os.path.basename(opts.calib), "tokens": calib_tokens} if calib_tokens else None,
            "policy": os.path.basename(opts.policy) if opts.policy else None,
            "activations": {"method": opts.act_method, "smooth_alpha": opts.smooth_alpha,
                            **({"percentile": opts.act_percentile} if opts.act_method == "percentile" else {})}
            if w8a8 else None}
    tensors, modules = save_quantized(loaded, weights, schemes, output, meta)

    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name, scheme_name in modules.items():
        counts[scheme_name] = counts.get(scheme_name, 0) + 1
        stored = [t for k, t in tensors.items() if k.rpartition(".")[0] == name]
        sizes[scheme_name] = sizes.get(scheme_name, 0) + sum(t.numel() * t.element_size() for t in stored)
    bf16_bytes = 2 * sum(p.numel() for p in loaded.model.parameters())

    quality = None
    if eval_ids is not None:
        mine = load_model(model, "float32", "cpu", "auto", before_finalize=install(weights))
        quality = compare(WindowRunner(mine, opts.ctx), WindowRunner(loaded, opts.ctx), eval_ids,
                          progress=opts.progress)
    return QuantizeResult(os.path.abspath(output), counts, sizes, os.path.getsize(os.path.join(output, WEIGHTS_FILE)),
                          bf16_bytes, calib_tokens, quality, opts.eval_text or opts.calib, time.perf_counter() - start,
                          {p: s.name for p, s in schemes.items()})
