"""The umT5 text encoder, its tokenizer, the prompt cache and golden parity."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from sf_sdk.config import TEXT_PRESETS
from sf_sdk.models.text import (
    PromptTokenizer,
    TextEncoder,
    UMT5Encoder,
    build_word_tokenizer,
    clean_prompt,
    load_umt5_encoder,
    pad_prompt_embeds,
    relative_position_buckets,
)
from sf_sdk.parity import t5 as t5_parity

GOLDEN = Path(os.environ.get("SF_SDK_GOLDEN", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
T5_GOLDEN = GOLDEN / "t5_encoder.safetensors"

TINY = TEXT_PRESETS["tiny"]
WORDS = ["a", "red", "green", "blue", "circle", "square", "moving", "left", "right", "up", "down", "."]


@pytest.fixture(scope="module")
def word_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_word_tokenizer(WORDS, tmp_path_factory.mktemp("words"))


@pytest.fixture()
def tiny_encoder() -> UMT5Encoder:
    torch.manual_seed(0)
    return UMT5Encoder(TINY).eval()


# --- golden parity -----------------------------------------------------------------------------


@pytest.mark.skipif(not T5_GOLDEN.is_file(), reason=f"golden file {T5_GOLDEN} not found")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_golden_parity(dtype: torch.dtype, tolerance: float) -> None:
    error, scale = t5_parity.check(T5_GOLDEN, dtype)["hidden"]
    assert scale > 0
    assert error / scale < tolerance, f"relative error {error / scale:.3g} in {dtype}"


def test_parameter_names_are_the_official_checkpoint_layout() -> None:
    with torch.device("meta"):
        model = UMT5Encoder(TEXT_PRESETS["umt5-xxl"])
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes["token_embedding.weight"] == (256384, 4096)
    assert shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)
    assert shapes["blocks.23.ffn.gate.0.weight"] == (10240, 4096)
    assert shapes["blocks.0.attn.o.weight"] == (4096, 4096)
    assert shapes["norm.weight"] == (4096,)
    per_block = {"norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
                 "pos_embedding.embedding.weight"}
    expected = {"token_embedding.weight", "norm.weight"} | {
        f"blocks.{i}.{name}" for i in range(24) for name in per_block}
    assert set(shapes) == expected


def test_relative_position_buckets_follow_t5() -> None:
    # T5, 32 bidirectional buckets, max distance 128: distances 0-7 exact, then log-spaced
    # buckets 8..15; keys after the query add 16.
    expected = {0: 0, 1: 1, 7: 7, 8: 8, 11: 8, 12: 9, 15: 9, 16: 10, 22: 10, 23: 11, 31: 11, 32: 12,
                45: 12, 46: 13, 63: 13, 64: 14, 90: 14, 91: 15, 127: 15, 128: 15, 300: 15}
    buckets = relative_position_buckets(301, num_buckets=32, max_distance=128)
    for distance, bucket in expected.items():
        assert buckets[0, distance] == (bucket + 16 if distance else 0), distance  # key after query
        assert buckets[distance, 0] == bucket, distance  # key before query


def test_load_official_layout_round_trip(tmp_path: Path, tiny_encoder: UMT5Encoder) -> None:
    path = tmp_path / "enc.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in tiny_encoder.state_dict().items()}, path)
    loaded = load_umt5_encoder(path, TINY, dtype=torch.float32)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, TINY.vocab, (2, 6))
    mask = torch.ones_like(ids)
    reference = tiny_encoder.to(torch.bfloat16).float()(ids, mask)
    torch.testing.assert_close(loaded(ids, mask), reference)
    with pytest.raises(ValueError, match="does not match TextEncoderConfig"):
        load_umt5_encoder(path, dataclasses.replace(TINY, num_layers=3))
    with pytest.raises(ValueError, match="does not exist"):
        load_umt5_encoder(tmp_path / "missing.pth", TINY)


def test_padding_is_masked_out(tiny_encoder: UMT5Encoder) -> None:
    ids = torch.randint(3, TINY.vocab, (1, 5))
    short = tiny_encoder(ids, torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.randint(3, TINY.vocab, (1, 4))], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 4])
    padded = tiny_encoder(padded_ids, mask)
    torch.testing.assert_close(padded[:, :5], short)
    unmasked = tiny_encoder(padded_ids, torch.ones_like(padded_ids))
    assert not torch.allclose(unmasked[:, :5], short, atol=1e-3)


# --- cleaning and tokenization ------------------------------------------------------------------


def test_clean_prompt_like_wan() -> None:
    assert clean_prompt("  a\tred \n\n circle  ") == "a red circle"
    assert clean_prompt("cats &amp;amp; dogs") == "cats & dogs"  # unescaped twice
    assert clean_prompt("\u201cquoted\u201d it\u2019s") == "\"quoted\" it's"


def test_word_tokenizer_round_trip(word_dir: Path) -> None:
    assert {p.name for p in word_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    tok = PromptTokenizer(word_dir, text_len=8)
    assert (tok.pad_id, tok.eos_id, tok.tokenizer.token_to_id("<unk>")) == (0, 1, 2)
    out = tok(["a red circle moving left", "Blue  SQUARE up."])
    vocab = tok.tokenizer.get_vocab()
    first = [vocab[w] for w in "a red circle moving left".split()]
    assert out.ids[0].tolist() == [*first, 1, 0, 0]
    assert out.mask[0].tolist() == [1] * 6 + [0] * 2
    assert out.lengths.tolist() == [6, 5]
    assert tok.decode(out.ids[0].tolist()) == "a red circle moving left"
    assert tok.decode(out.ids[1].tolist()) == "blue square up ."
    assert tok(["a purple circle"]).ids[0, 1].item() == 2  # unknown word -> <unk>


def test_truncation_matches_the_hf_fast_tokenizer(word_dir: Path) -> None:
    # Wan calls the fast tokenizer with truncation=True, max_length=text_len, padding to
    # max_length and add_special_tokens=True; that is the `tokenizers` pipeline below.
    caption = "a red circle moving left a blue square moving up"
    reference = Tokenizer.from_file(str(word_dir / "tokenizer.json"))
    reference.enable_truncation(max_length=6)
    reference.enable_padding(length=6, pad_id=0, pad_token="<pad>")
    for text in (caption, "a red circle"):
        expected = reference.encode(text, add_special_tokens=True)
        ours = PromptTokenizer(word_dir, text_len=6)(text)
        assert ours.ids[0].tolist() == expected.ids
        assert ours.mask[0].tolist() == expected.attention_mask
    truncated = PromptTokenizer(word_dir, text_len=6)(caption)
    assert truncated.ids[0, -1].item() == 1 and truncated.mask[0].all()  # first 5 words + EOS


def test_tokenizer_errors(tmp_path: Path, word_dir: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        PromptTokenizer(tmp_path / "nowhere", text_len=8)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        PromptTokenizer(tmp_path, text_len=8)
    tok = PromptTokenizer(word_dir, text_len=8)
    for bad in ("", "  \n ", ["a red circle", ""]):
        with pytest.raises(ValueError, match="empty"):
            tok(bad)
    with pytest.raises(ValueError, match="no prompts"):
        tok([])
    with pytest.raises(ValueError, match="single word"):
        build_word_tokenizer(["red circle"], tmp_path / "bad")
    with pytest.raises(ValueError, match="reserved"):
        build_word_tokenizer(["</s>"], tmp_path / "bad")


# --- TextEncoder and padding --------------------------------------------------------------------


def _count_forwards(encoder: UMT5Encoder) -> list[int]:
    calls = [0]
    encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_text_encoder_trims_rows_like_wan(word_dir: Path, tiny_encoder: UMT5Encoder) -> None:
    tok = PromptTokenizer(word_dir, text_len=TINY.text_len)
    text_encoder = TextEncoder(tiny_encoder, tok)
    prompts = ["a red circle moving left", "a blue square"]
    embeds = text_encoder.encode(prompts)
    assert [tuple(e.shape) for e in embeds] == [(6, TINY.dim), (4, TINY.dim)]
    # Wan: pad every prompt to text_len, run the encoder, keep the first mask.sum() rows.
    tokens = tok(prompts)
    full = tiny_encoder(tokens.ids, tokens.mask)  # [2, text_len, dim]
    for embed, row, n in zip(embeds, full, tokens.lengths.tolist()):
        torch.testing.assert_close(embed, row[:n])
    with pytest.raises(ValueError, match="empty"):
        text_encoder.encode(" ")


def test_text_encoder_cache(word_dir: Path, tiny_encoder: UMT5Encoder) -> None:
    text_encoder = TextEncoder(tiny_encoder, PromptTokenizer(word_dir, TINY.text_len), cache_size=2)
    calls = _count_forwards(tiny_encoder)
    first = text_encoder.encode(["a red circle", "a blue square", "a red circle"])
    assert calls[0] == 1 and text_encoder.cache_misses == 2
    torch.testing.assert_close(first[0], first[2])

    first[0].zero_()  # callers get copies: the cache is untouched
    again = text_encoder.encode(["a  red circle", "a blue square"])  # same text after cleaning
    assert calls[0] == 1 and text_encoder.cache_hits == 3
    torch.testing.assert_close(again[0], first[2])

    text_encoder.encode("a green square")  # evicts the least recently used ("a red circle")
    assert calls[0] == 2
    text_encoder.encode("a blue square")
    assert calls[0] == 2
    text_encoder.encode("a red circle")
    assert calls[0] == 3

    uncached = TextEncoder(tiny_encoder, PromptTokenizer(word_dir, TINY.text_len), cache_size=0)
    uncached.encode("a red circle")
    uncached.encode("a red circle")
    assert calls[0] == 5


def test_text_encoder_rejects_a_larger_vocab(word_dir: Path) -> None:
    small = UMT5Encoder(dataclasses.replace(TINY, vocab=5))
    with pytest.raises(ValueError, match="more than the encoder's vocab"):
        TextEncoder(small, PromptTokenizer(word_dir, TINY.text_len))


def test_pad_prompt_embeds() -> None:
    embeds = [torch.randn(3, 4), torch.randn(5, 4)]
    padded = pad_prompt_embeds(embeds, text_len=6)
    assert padded.shape == (2, 6, 4)
    torch.testing.assert_close(padded[1, :5], embeds[1])
    assert padded[0, 3:].abs().sum() == 0 and padded[1, 5:].abs().sum() == 0
    with pytest.raises(ValueError, match="more than text_len"):
        pad_prompt_embeds(embeds, text_len=4)
    with pytest.raises(ValueError, match="width"):
        pad_prompt_embeds([torch.randn(3, 4), torch.randn(3, 5)], text_len=6)
    with pytest.raises(ValueError, match="no prompt embeddings"):
        pad_prompt_embeds([], text_len=6)


def test_text_encoder_from_files(tmp_path: Path, word_dir: Path, tiny_encoder: UMT5Encoder) -> None:
    torch.save(tiny_encoder.state_dict(), tmp_path / "enc.pth")
    text_encoder = TextEncoder.from_files(tmp_path / "enc.pth", word_dir, TINY, dtype=torch.float64)
    (embed,) = text_encoder.encode("a red circle")
    assert embed.dtype == torch.float64 and embed.shape == (4, TINY.dim)
    tokens = text_encoder.tokenizer("a red circle")
    expected = tiny_encoder.double()(tokens.ids, tokens.mask)[0, :4]
    torch.testing.assert_close(embed, expected)
