"""Tokenizers from GGUF metadata and tokenizer.json agree with the references; chat templates;
incremental detokenization across multi-byte characters."""

from __future__ import annotations

import os

import pytest

from surge.loader.gguf import open_gguf, tokenizer_metadata
from surge.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé façade naïve café, 東京タワー, Привет мир, مرحبا",
    "emoji 🚀🔥 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "def f(x):\n\treturn x**2  # square\n\n\nclass A:\n    pass\n",
    "runs   of    spaces\t\ttabs\n\n\nnewlines  \n ",
    " leading space",
    "trailing spaces   ",
    "numbers 1 22 333 4444 3.14159 1,000,000 2026-11-21",
    "I'm sure you're right, they'll see we've done it",
    "<|im_start|>user\nhi<|im_end|>",
    "\u00a0non-breaking\u200bzero-width",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke 🤡"}],
]


@pytest.fixture(scope="module")
def gguf_pair(default_gguf_path):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf_metadata(tokenizer_metadata(open_gguf(default_gguf_path)))
    ref = AutoTokenizer.from_pretrained(
        os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path))
    return ours, ref


@pytest.fixture(scope="module")
def hf_pair(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return Tokenizer.from_hf_dir(str(tiny_tokenizer_dir)), AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("pair", ["gguf_pair", "hf_pair"])
def test_encode_decode_match_transformers(pair, request):
    ours, ref = request.getfixturevalue(pair)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("pair", ["gguf_pair", "hf_pair"])
def test_round_trip(pair, request):
    ours, _ = request.getfixturevalue(pair)
    for text in TEXTS:
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


@pytest.mark.parametrize("pair", ["gguf_pair", "hf_pair"])
def test_chat_template_matches_transformers(pair, request):
    ours, ref = request.getfixturevalue(pair)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
        want_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(want_ids, dict) or hasattr(want_ids, "input_ids"):
            want_ids = want_ids["input_ids"]
        assert ours.encode_chat(messages) == list(want_ids)


def test_special_tokens_from_gguf_metadata(gguf_pair):
    ours, _ = gguf_pair
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_ids == (2,)
    assert ours.bos_token == "<|im_start|>"
    assert ours.encode("hi")[0] != ours.bos_token_id  # add_bos_token is false for SmolLM2
    assert ours.encode("<|im_end|>", add_special_tokens=False) == [2]  # control tokens match whole


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A SentencePiece BPE model with byte fallback, trained like Llama's (identity normalization)."""
    import sentencepiece as spm

    from tests.conftest import CORPUS

    path = tmp_path_factory.mktemp("spm")
    corpus = path / "corpus.txt"
    corpus.write_text(CORPUS.replace("🚀🔥", "") * 5, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "m"), model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.995, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(path / "m.model"))


def _llama_gguf_metadata(sp) -> dict:
    """What llama.cpp's converter writes for a SentencePiece vocabulary."""
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    return {
        "model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)], "token_type": types,
        "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0, "add_bos_token": True,
    }


def test_sentencepiece_vocabulary_matches_sentencepiece(sentencepiece_model):
    sp = sentencepiece_model
    ours = Tokenizer.from_gguf_metadata(_llama_gguf_metadata(sp))
    for text in TEXTS[:-1]:  # sentencepiece encodes "" to [] without BOS
        assert ours.encode(text) == [1] + sp.encode(text), text
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)), text


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, [])
    return [detok.add(t) for t in ids]


@pytest.mark.parametrize("pair", ["gguf_pair", "hf_pair"])
def test_incremental_detokenization(pair, request):
    ours, _ = request.getfixturevalue(pair)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        deltas = _stream(ours, ids)
        assert "".join(deltas) == ours.decode(ids), text
        assert not any("\ufffd" in d for d in deltas), text


def test_incremental_detokenization_byte_fallback(sentencepiece_model):
    """Emoji missing from the vocabulary arrive as 4 byte tokens; nothing is emitted until the 4th."""
    ours = Tokenizer.from_gguf_metadata(_llama_gguf_metadata(sentencepiece_model))
    ids = ours.encode("go 🚀 now é", add_special_tokens=False)
    assert sum(1 for i in ids if ours.id_to_token(i).startswith("<0x")) >= 4
    deltas = _stream(ours, ids)
    assert "".join(deltas) == "go 🚀 now é"
    assert not any("\ufffd" in d for d in deltas)
    assert "🚀" in deltas[[i for i, d in enumerate(deltas) if "🚀" in d][0]]
