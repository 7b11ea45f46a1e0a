"""Teacher-forced top-1 agreement with the float model over 256 tokens of text, through the
decode kernels (a few rows per step) and through the dense prefill path."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge.loader import load_model
from tests.helpers import surge_logits

TEXT = (Path(__file__).resolve().parents[2] / "README.md").read_text()
STEP = 8  # rows per step: below DENSE_MIN_ROWS, so the packed kernels run


@pytest.fixture(scope="module")
def reference():
    loaded = load_model(None, "float32", "cpu", quantization="none")
    ids = loaded.tokenizer.encode(TEXT)[:257]
    (logits,) = surge_logits(loaded, [ids])
    return ids, logits.argmax(-1)


@pytest.mark.parametrize("quantization", ["auto", "int8", "int4"])
def test_top1_agreement_with_float(reference, quantization):
    """auto = the GGUF's own 4-bit weights (Q4_1) and 8-bit LM head (Q8_0); int8 / int4 =
    requantized from the float weights."""
    ids, want = reference
    loaded = load_model(None, "float32", "cpu", quantization=quantization, group_size=32)
    assert loaded.quantization != "none"
    (decode,) = surge_logits(loaded, [ids], chunks=-(-len(ids) // STEP))  # at most STEP rows a step
    decode = decode.argmax(-1)
    (prefill,) = surge_logits(loaded, [ids])
    for got in (decode, prefill.argmax(-1)):
        agreement = (got[:256] == want[:256]).float().mean().item()
        assert agreement >= 0.95, f"{quantization}: top-1 agreement {agreement:.3f}"
