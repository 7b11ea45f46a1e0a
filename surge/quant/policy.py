"""Mixed precision: which scheme each module of a model is stored in, from a policy file.

A policy is a TOML (or JSON) file of rules; a module takes the scheme of the first rule whose
pattern (shell-style, `fnmatch`) matches its name, else the default:

    default = "int4-g64"              # optional: --scheme otherwise
    [modules]
    "lm_head" = "int8-g32"
    "*.self_attn.*" = "bf16"
    "model.layers.0.*" = "int8"

Names are the checkpoint's (Hugging Face) names: model.layers.N.self_attn.{q,k,v,o}_proj,
model.layers.N.mlp.{gate,up,down}_proj, lm_head, model.embed_tokens; surge's fused names
(qkv_proj, gate_up_proj) match too. q/k/v and gate/up run as one fused linear each, so they
must get one scheme.

The default policy (no file): every decoder linear in the scheme; the LM head in int8-g32
when the scheme is quantized (the most sensitive matrix: per-channel int8 flips ~3% of the
default model's top-1 tokens, int8 in groups of 32 none); the embedding table in bf16 (it is
looked up, not multiplied, so it stays float).
"""

from __future__ import annotations

import fnmatch
import json
import os
import tomllib
from dataclasses import dataclass, field

from torch import nn

from surge.errors import InvalidArgumentError
from surge.quant.grid import group_size_of
from surge.layers.quantization.schemes import Scheme, parse_scheme

EMBEDDING = "model.embed_tokens"
LM_HEAD_SCHEME = "int8-g32"
EMBEDDING_SCHEME = "bf16"
# fused module name part -> the checkpoint's module name parts stacked in it
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class Policy:
    default: str | None = None
    rules: list[tuple[str, str]] = field(default_factory=list)  # (pattern, scheme name), in file order
    source: str = "the default policy"


def load_policy(path: str) -> Policy:
    """Read and check a policy file: TOML, or JSON by its extension."""
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"policy file {path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = json.load(f) if path.endswith(".json") else tomllib.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"policy file {path}: not valid {'JSON' if path.endswith('.json') else 'TOML'} "
                                   f"({exc})") from exc
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"policy file {path}: expected a table with 'default' and [modules]")
    unknown = sorted(set(raw) - {"default", "modules"})
    if unknown:
        raise InvalidArgumentError(f"policy file {path}: unknown key {unknown[0]!r} (a policy has 'default' and "
                                   "[modules])")
    modules = raw.get("modules", {})
    default = raw.get("default")
    if not isinstance(modules, dict) or not all(isinstance(v, str) for v in modules.values()):
        raise InvalidArgumentError(f"policy file {path}: [modules] must map name patterns to scheme names")
    if default is not None and not isinstance(default, str):
        raise InvalidArgumentError(f"policy file {path}: 'default' must be a scheme name")
    for name in [default, *modules.values()]:
        if name is not None:
            try:
                parse_scheme(name)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"policy file {path}: {exc}") from exc
    return Policy(default, list(modules.items()), path)


def checkpoint_names(path: str) -> list[str]:
    """The checkpoint's module names behind one of surge's (fused) module paths."""
    parent, _, leaf = path.rpartition(".")
    return [f"{parent}.{p}" for p in FUSED_PARTS[leaf]] if leaf in FUSED_PARTS else [path]


def resolve_policy(model: nn.Module, policy: Policy, scheme: str | None) -> dict[str, Scheme]:
    """Module path (surge's, fused) -> scheme for every linear and the embedding, checked
    against the model: patterns that match nothing, fused parts given different schemes, and
    group sizes that do not divide a module's inputs are errors naming them."""
    default_name = policy.default or scheme
    if default_name is None:
        raise InvalidArgumentError("no scheme: pass --scheme or give the policy a 'default'")
    default = parse_scheme(default_name)
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out: dict[str, Scheme] = {}

    def choose(names: tuple[str, ...], fallback: Scheme) -> Scheme:
        for pattern, scheme_name in policy.rules:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return parse_scheme(scheme_name)
        return fallback

    for path in [*linears, EMBEDDING]:
        if path == EMBEDDING:
            fallback = parse_scheme(EMBEDDING_SCHEME)
        elif path == "lm_head" and default.quantized:
            fallback = parse_scheme(LM_HEAD_SCHEME)
        else:
            fallback = default
        names = checkpoint_names(path)
        # a part takes the first rule naming it or its fused module
        chosen = {n: choose((n, path), fallback) for n in names}
        if len({s.name for s in chosen.values()}) > 1:
            detail = ", ".join(f"{n.rpartition('.')[2]}: {s.name}" for n, s in chosen.items())
            raise InvalidArgumentError(
                f"{policy.source}: {path} runs {', '.join(n.rpartition('.')[2] for n in names)} as one fused "
                f"linear; give them one scheme (got {detail})")
        out[path] = next(iter(chosen.values()))
    names = {n for path in out for n in (path, *checkpoint_names(path))}
    unused = [p for p, _ in policy.rules if not fnmatch.filter(names, p)]
    if unused:
        raise InvalidArgumentError(
            f"{policy.source}: pattern {unused[0]!r} names no module of this model (modules are named like "
            "model.layers.0.self_attn.q_proj, model.layers.0.mlp.down_proj, lm_head, model.embed_tokens)")
    if out[EMBEDDING].quantized:
        raise InvalidArgumentError(
            f"{policy.source}: {EMBEDDING} is looked up, not multiplied; give it a float scheme (bf16, fp16, fp32)")
    if tied and not out["lm_head"].quantized:
        out["lm_head"] = out[EMBEDDING]  # a float LM head tied to the embedding is the embedding
    for path, s in out.items():
        if s.quantized:
            group_size_of(s, linears[path].in_features, path)
    return out
