"""LongRoPE frequencies against transformers' own computation, for each factor set: short for
a model whose context is the pretrained one, long for one that extends it."""

from __future__ import annotations

import pytest
import torch

from surge.config import RopeConfig
from surge.errors import InvalidArgumentError
from surge.layers.rotary import inverse_frequencies


def _phi3_config(max_positions: int, original: int, head_dim: int = 32, partial: float = 0.75):
    import transformers

    half = int(head_dim * partial) // 2
    return transformers.Phi3Config(
        vocab_size=64, hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=max_positions, original_max_position_embeddings=original, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
                         "original_max_position_embeddings": original,
                         "short_factor": [1.0 + 0.1 * i for i in range(half)],
                         "long_factor": [2.0 + 0.9 * i for i in range(half)]})


@pytest.mark.parametrize("max_positions, original, long", [(4096, 4096, False), (131072, 4096, True), (512, 64, True)])
def test_longrope_equals_transformers(max_positions, original, long):
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    config = _phi3_config(max_positions, original)
    want, want_scale = _compute_longrope_parameters(config, seq_len=original + 1 if long else None)
    params = config.rope_parameters
    rope = RopeConfig.from_hf({**params, "factor": max_positions / original}, 10000.0)
    got, scale = inverse_frequencies(rope, 32, max_positions)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)
    assert (scale > 1.0) == (max_positions > original)


def test_longrope_needs_both_factor_sets():
    with pytest.raises(InvalidArgumentError, match="needs short_factor and long_factor"):
        RopeConfig.from_hf({"rope_type": "longrope", "short_factor": [1.0]}, 10000.0)
    assert RopeConfig.from_hf({"type": "su", "short_factor": [1.0], "long_factor": [2.0]}, 1.0).rope_type == "longrope"


def test_longrope_factors_of_the_wrong_length_name_the_file(tmp_path):
    import json

    from surge.errors import ModelFormatError
    from surge.loader.hf_config import config_from_hf_dir

    config = _phi3_config(512, 64).to_dict()
    config["architectures"] = ["Phi3ForCausalLM"]
    config["rope_parameters"]["long_factor"] = [1.0, 2.0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"config.json: .*long_factor has 2 values; the rotated head dimension needs 12"):
        config_from_hf_dir(str(tmp_path))
