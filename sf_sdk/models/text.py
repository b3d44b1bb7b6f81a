"""The umT5 text encoder in Wan's checkpoint layout, its tokenizer and the prompt-embedding cache.

Read top to bottom: the encoder (norm, relative-position buckets, attention, feed-forward,
block, model), loading the official checkpoint, prompt cleaning and tokenization, then
:class:`TextEncoder`, which ties them together, and :func:`pad_prompt_embeds`.

The encoder computes what the official Wan2.1 umT5 encoder computes:

* T5 RMS layer norm (no mean subtraction, no bias), statistics in float32 or better;
* attention logits are *not* scaled by ``1/sqrt(head_dim)`` (T5 folds that into the weights);
* a per-head additive bias from bidirectional relative-position buckets, one table per layer
  (``shared_pos=False``, umT5) or one for the whole encoder (``shared_pos=True``);
* padded keys get the most negative finite value of the activation dtype as bias;
* gated GELU(tanh) feed-forward ``fc2(fc1(x) * gelu(gate(x)))``;
* float16 activations are clamped after a residual add that overflowed to inf.

Parameter names equal the official ones, so ``models_t5_umt5-xxl-enc-bf16.pth`` loads with
``load_state_dict``. Only a prompt's real rows (``mask == 1``, its tokens and EOS) are
meaningful; Wan keeps exactly those rows as the prompt embedding, and the DiT pads them with
zeros to ``text_len`` without masking (:func:`pad_prompt_embeds`).
"""

from __future__ import annotations

import html
import json
import logging
import math
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sf_sdk.config import TEXT_PRESETS, TextEncoderConfig

__all__ = [
    "UMT5Encoder",
    "relative_position_buckets",
    "load_umt5_encoder",
    "clean_prompt",
    "TokenizedPrompts",
    "PromptTokenizer",
    "build_word_tokenizer",
    "TextEncoder",
    "pad_prompt_embeds",
]

log = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
# The official encoder clamps float16 activations that overflowed to this margin below the max.
_FP16_CLAMP = torch.finfo(torch.float16).max - 1000.0


def _clamp_if_overflowed(x: Tensor) -> Tensor:
    """Clamp float16 activations to a finite range when any became inf (no host sync)."""
    if x.dtype != torch.float16:
        return x
    return torch.where(torch.isinf(x).any(), x.clamp(-_FP16_CLAMP, _FP16_CLAMP), x)


# --------------------------------------------------------------------------------------------
# Encoder blocks
# --------------------------------------------------------------------------------------------


class T5RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``; half-precision inputs use float32 statistics."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        stats = x.float() if x.dtype in _HALF_DTYPES else x
        normed = stats * torch.rsqrt(stats.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | str | None = None) -> Tensor:
    """Bidirectional T5 bucket of every (query, key) pair: a LongTensor [length, length].

    Keys after the query use buckets ``[num_buckets // 2, num_buckets)``, keys at or before it
    ``[0, num_buckets // 2)``. Within a direction, distances below a quarter of ``num_buckets``
    get one bucket each; larger distances share log-spaced buckets up to ``max_distance``, and
    farther keys all fall in the last bucket. The log is taken in float32, as in the official
    code, so bucket edges match it exactly.
    """
    half = num_buckets // 2
    exact = half // 2
    positions = torch.arange(length, device=device)
    offset = positions.view(1, -1) - positions.view(-1, 1)  # [Lq, Lk], key minus query
    direction = (offset > 0).long() * half
    distance = offset.abs()
    # Clamped so the log is finite; distances below `exact` use their exact bucket instead.
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return direction + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned per-head bias for each relative-position bucket."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        """buckets [Lq, Lk] -> bias [1, H, Lq, Lk]."""
        bias = self.embedding(buckets)  # [Lq, Lk, H]
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, H, Lq, Lk]


class T5Attention(nn.Module):
    """Multi-head self-attention with an additive bias and no logit scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, L, dim], bias [B or 1, H, L, L] added to the logits -> [B, L, dim]."""
        b, length, _ = x.shape
        heads = (b, length, self.num_heads, self.head_dim)
        q = self.q(x).view(heads).transpose(1, 2)  # [B, H, L, Dh]
        k = self.k(x).view(heads).transpose(1, 2)  # [B, H, L, Dh]
        v = self.v(x).view(heads).transpose(1, 2)  # [B, H, L, Dh]
        # sf_sdk.attention.attention takes a boolean mask and the default scale; T5 needs an
        # additive bias and scale 1, so it calls SDPA directly.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [B, H, L, Dh]
        out = out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim)  # [B, L, dim_attn]
        return F.dropout(self.o(out), self.dropout, self.training)


class GatedFeedForward(nn.Module):
    """``fc2(fc1(x) * gelu_tanh(gate(x)))``; ``gate`` is a Sequential so its key is ``gate.0``."""

    def __init__(self, dim: int, dim_ffn: int, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.dropout(self.fc1(x) * self.gate(x), self.dropout, self.training)  # [B, L, dim_ffn]
        return F.dropout(self.fc2(hidden), self.dropout, self.training)


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual connection."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads, config.dropout)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = GatedFeedForward(config.dim, config.dim_ffn, config.dropout)
        # umT5 (shared_pos=False) learns one bucket table per layer.
        self.pos_embedding = (None if config.shared_pos
                              else RelativePositionBias(config.num_buckets, config.num_heads))

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = _clamp_if_overflowed(x + self.attn(self.norm1(x), bias))
        return _clamp_if_overflowed(x + self.ffn(self.norm2(x)))


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack: ``forward(ids [B, L], mask [B, L]) -> hidden [B, L, dim]``.

    ``mask`` is 1 (or True) for real tokens and 0 for padding; padded keys are excluded from
    attention, so the rows of real tokens do not depend on how much padding follows them.
    Padded rows hold whatever the encoder computes there (as in Wan) and should be dropped.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab, config.dim)
        self.pos_embedding = (RelativePositionBias(config.num_buckets, config.num_heads)
                              if config.shared_pos else None)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim, config.eps)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, length] token ids, got shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of ids {tuple(ids.shape)}")
        cfg = self.config
        b, length = ids.shape
        x = F.dropout(self.token_embedding(ids), cfg.dropout, self.training)  # [B, L, dim]
        buckets = relative_position_buckets(length, cfg.num_buckets, cfg.max_distance,
                                            ids.device)  # [L, L]
        padded_keys = None if mask is None else (mask == 0).view(b, 1, 1, length)  # [B, 1, 1, L]
        shared_bias = self.pos_embedding(buckets) if self.pos_embedding is not None else None
        for block in self.blocks:
            pos_bias = shared_bias if shared_bias is not None else block.pos_embedding(buckets)
            x = block(x, self._attention_bias(pos_bias.to(x.dtype), padded_keys))
        return F.dropout(self.norm(x), cfg.dropout, self.training)

    @staticmethod
    def _attention_bias(pos_bias: Tensor, padded_keys: Tensor | None) -> Tensor:
        """Position bias [1, H, L, L] with padded keys set to the dtype's most negative value."""
        if padded_keys is None:
            return pos_bias
        return pos_bias.masked_fill(padded_keys, torch.finfo(pos_bias.dtype).min)  # [B, H, L, L]


def load_umt5_encoder(path: str | Path, config: TextEncoderConfig | None = None, *,
                      device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> UMT5Encoder:
    """Load an encoder state dict in the official layout (``.pth`` or ``.safetensors``).

    The official ``models_t5_umt5-xxl-enc-bf16.pth`` loads with the default config. The module
    is built on the meta device and takes the file's tensors (memory-mapped), then moves to
    ``device`` / ``dtype``; it is returned in eval mode without gradients.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text encoder checkpoint {path} does not exist; pass the path of "
                         f"models_t5_umt5-xxl-enc-bf16.pth from the Wan2.1 model folder")
    config = config if config is not None else TEXT_PRESETS["umt5-xxl"]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    with torch.device("meta"):
        model = UMT5Encoder(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(state[n].shape) != expected[n])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match TextEncoderConfig {config}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, wrong shapes {wrong[:5]} (first five of each); "
            f"pass the config the checkpoint was trained with")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Prompt cleaning and tokenization
# --------------------------------------------------------------------------------------------

try:  # Wan repairs text with ftfy; it is optional here (see clean_prompt).
    import ftfy as _ftfy
except ImportError:
    _ftfy = None

# Curly quotes that ftfy straightens (its `uncurl_quotes` fix).
_UNCURL = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'`` prompt cleaning.

    Repair the text with ``ftfy.fix_text``, unescape HTML entities twice, collapse every run of
    whitespace to one space and strip the ends. Without ftfy installed, only its Unicode NFC
    normalization and quote straightening are applied (mojibake repair is skipped); the
    tokenizer's own NFKC normalizer covers width and ligature forms either way.
    """
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    else:
        text = unicodedata.normalize("NFC", text).translate(_UNCURL)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


@dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids and padding mask, both int64 [B, text_len]; mask is 1 on tokens and EOS."""

    ids: Tensor
    mask: Tensor

    @property
    def lengths(self) -> Tensor:
        """Real rows per prompt (tokens + EOS), int64 [B]."""
        return self.mask.sum(dim=1)


def _special_token(config: dict, key: str, default: str) -> str:
    """A special token's text from tokenizer_config.json (a string or an AddedToken dict)."""
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else str(value)


class PromptTokenizer:
    """A Hugging Face tokenizer folder (``tokenizer.json``) used the way Wan uses umT5's.

    ``__call__`` cleans each prompt (:func:`clean_prompt`), tokenizes it without special
    tokens, keeps at most ``text_len - 1`` tokens, appends EOS and right-pads with the pad id
    to ``text_len``. That is what Wan's tokenizer call (``padding="max_length",
    truncation=True, max_length=text_len, add_special_tokens=True``) produces: a prompt that
    is too long keeps its first ``text_len - 1`` tokens and still ends with EOS (a warning is
    logged). Pad and EOS tokens come from ``tokenizer_config.json`` when it names them, else
    T5's ``<pad>`` and ``</s>``; so does the unknown token (``<unk>``), which
    :meth:`unknown_words` uses to find the words the vocabulary cannot spell.
    """

    def __init__(self, folder: str | Path, text_len: int, *, clean: bool = True) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {folder} does not exist; pass the Hugging Face "
                             f"tokenizer folder (e.g. google/umt5-xxl inside the Wan2.1 model folder)")
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{folder} has no tokenizer.json; use a Hugging Face tokenizer folder "
                             f"saved with a fast tokenizer (google/umt5-xxl ships one), or build one "
                             f"with build_word_tokenizer")
        if text_len < 2:
            raise ValueError(f"text_len must leave room for a token and EOS (>= 2), got {text_len}")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.folder = folder
        self.text_len = text_len
        self.clean = clean
        self.tokenizer = Tokenizer.from_file(str(file))
        self.pad_id = self._token_id(_special_token(config, "pad_token", "<pad>"))
        self.eos_id = self._token_id(_special_token(config, "eos_token", "</s>"))
        # None: a vocabulary without an unknown token (byte-level BPE spells every text).
        self.unk_id = self.tokenizer.token_to_id(_special_token(config, "unk_token", "<unk>"))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary of {self.folder}")
        return token_id

    def prepare(self, prompt: str) -> str:
        """The cleaned text that is tokenized; rejects non-strings and empty prompts."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a str, got {type(prompt).__name__}")
        text = clean_prompt(prompt) if self.clean else prompt
        if not text:
            raise ValueError(f"prompt {prompt!r} is empty after cleaning; give a non-empty text prompt")
        return text

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        prompts = _as_prompt_list(prompts)
        return self.tokenize_prepared([self.prepare(p) for p in prompts])

    def tokenize_prepared(self, texts: Sequence[str]) -> TokenizedPrompts:
        """Tokenize texts already passed through :meth:`prepare`."""
        max_tokens = self.text_len - 1  # one row is kept for EOS
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)  # [B, text_len]
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.long)  # [B, text_len]
        for row, (text, encoding) in enumerate(
                zip(texts, self.tokenizer.encode_batch(list(texts), add_special_tokens=False))):
            tokens = encoding.ids
            if len(tokens) > max_tokens:
                log.warning("prompt %r has %d tokens; keeping the first %d and EOS (text_len %d), "
                            "as Wan does", text[:60], len(tokens), max_tokens, self.text_len)
                tokens = tokens[:max_tokens]
            tokens = [*tokens, self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return TokenizedPrompts(ids=ids, mask=mask)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` (as :meth:`prepare` returns it) that become the unknown token.

        A word-level vocabulary (:func:`build_word_tokenizer`) maps every word it lacks to
        ``<unk>``; a SentencePiece vocabulary such as umT5's spells almost any text in pieces
        and yields ``<unk>`` only for characters it has never seen, so it rarely reports any.
        Only tokens that are the unknown id count: no false alarms for words split in pieces.
        Punctuation (a piece without a letter or digit) is not reported.
        """
        if self.unk_id is None:
            return []
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        words = [text[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets)
                 if token == self.unk_id]
        return list(dict.fromkeys(w for w in words if any(c.isalnum() for c in w)))

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text, without pad / EOS / other special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass a str or a non-empty list of str")
    return prompts


# T5 conventions for the ids of the special tokens.
_WORD_SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2}


def build_word_tokenizer(words: Sequence[str], out_dir: str | Path) -> Path:
    """Write a word-level Hugging Face tokenizer folder for a synthetic caption domain.

    The vocabulary is ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 (T5's conventions), then the
    distinct lower-cased ``words`` in the order given. Text is NFKC-normalized, lower-cased
    and split on whitespace and punctuation (a punctuation mark is its own word); unknown
    words map to ``<unk>``. The folder holds ``tokenizer.json`` and ``tokenizer_config.json``
    and loads with :class:`PromptTokenizer` (or ``transformers.AutoTokenizer``, which also
    appends EOS through the template post-processor). Returns the folder.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = dict(_WORD_SPECIALS)
    for word in words:
        if not isinstance(word, str):
            raise ValueError(f"words must be str, got {type(word).__name__}")
        word = unicodedata.normalize("NFKC", word).lower()
        if word in _WORD_SPECIALS:
            raise ValueError(f"{word!r} is a reserved special token; leave it out of words")
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(word)]
        if pieces != [word]:
            raise ValueError(f"{word!r} is not a single word (it splits into {pieces}); pass words "
                             f"without spaces, and punctuation marks as separate words")
        vocab.setdefault(word, len(vocab))
    if len(vocab) == len(_WORD_SPECIALS):
        raise ValueError("words is empty; pass the words of the captions")

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in _WORD_SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", _WORD_SPECIALS["</s>"])])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
              "eos_token": "</s>", "unk_token": "<unk>", "padding_side": "right"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("wrote a %d-token word-level tokenizer to %s", len(vocab), out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# Prompt encoding with a cache
# --------------------------------------------------------------------------------------------


_WARNED_PROMPTS = 1024


class TextEncoder:
    """Prompts -> per-prompt embeddings [n_tokens + 1, dim], with an LRU cache.

    ``encode`` returns each prompt's encoder rows trimmed to its real tokens (tokens and EOS),
    as Wan does. Prompts are keyed in the cache by their cleaned text (a str); the most
    recent ``cache_size`` are kept (0 disables the cache) and a hit runs no encoder.
    Returned tensors are copies, so changing them never changes the cache.

    Misses are encoded in one batch padded to the longest of them rather than to
    ``text_len``: padded keys are masked out of attention, so the real rows are the same
    (up to floating-point summation order) as with Wan's padding to ``text_len``.

    A prompt with words the tokenizer cannot read (:meth:`PromptTokenizer.unknown_words`) is
    encoded all the same, with one logged warning naming them (once per prompt: the last
    ``_WARNED_PROMPTS`` prompts warned about are remembered), since the video cannot show them.
    """

    def __init__(self, encoder: UMT5Encoder, tokenizer: PromptTokenizer, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 cache_size: int = 8) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 (0 disables the cache), got {cache_size}")
        vocab = encoder.config.vocab
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer in {tokenizer.folder} has {tokenizer.vocab_size} tokens, "
                             f"more than the encoder's vocab ({vocab}); use the matching tokenizer")
        self.encoder = encoder.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self._warned: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_files(cls, checkpoint: str | Path, tokenizer_dir: str | Path,
                   config: TextEncoderConfig | None = None, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   cache_size: int = 8) -> TextEncoder:
        """The official encoder checkpoint plus its tokenizer folder (``google/umt5-xxl``)."""
        config = config if config is not None else TEXT_PRESETS["umt5-xxl"]
        encoder = load_umt5_encoder(checkpoint, config, device=device, dtype=dtype)
        return cls(encoder, PromptTokenizer(tokenizer_dir, config.text_len), cache_size=cache_size)

    @property
    def device(self) -> torch.device:
        return self.encoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.token_embedding.weight.dtype

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> list[Tensor]:
        """One embedding [n_i, dim] per prompt, n_i = its token count + 1 (EOS)."""
        texts = [self.tokenizer.prepare(p) for p in _as_prompt_list(prompts)]
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        self.cache_misses += len(missing)
        self.cache_hits += len(texts) - len(missing)
        for text in missing:
            self._warn_unknown_words(text)
        fresh = dict(zip(missing, self._run(missing))) if missing else {}
        out = []
        for text in texts:
            embed = fresh[text] if text in fresh else self._cache[text]
            out.append(embed.clone())
        if self.cache_size:
            for text in texts:  # store / refresh in prompt order, then evict the least recent
                if text in fresh:
                    self._cache[text] = fresh[text]
                self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def _warn_unknown_words(self, text: str) -> None:
        if text in self._warned:
            return
        unknown = self.tokenizer.unknown_words(text)
        if not unknown:
            return
        self._warned[text] = None
        while len(self._warned) > _WARNED_PROMPTS:
            self._warned.popitem(last=False)
        log.warning("prompt %r: the model does not know the word%s %s; %s read as an unknown token, so the "
                    "video will not show %s: use words the model was trained on", text[:80],
                    "s" if len(unknown) > 1 else "", ", ".join(repr(w) for w in unknown),
                    "they are" if len(unknown) > 1 else "it is", "them" if len(unknown) > 1 else "it")

    def _run(self, texts: list[str]) -> list[Tensor]:
        tokens = self.tokenizer.tokenize_prepared(texts)
        lengths = tokens.lengths.tolist()
        longest = max(lengths)
        ids = tokens.ids[:, :longest].to(self.device)  # [B, longest]
        mask = tokens.mask[:, :longest].to(self.device)  # [B, longest]
        hidden = self.encoder(ids, mask)  # [B, longest, dim]
        return [h[:n].clone() for h, n in zip(hidden, lengths)]  # compact, not views of the batch


def pad_prompt_embeds(embeds: Sequence[Tensor], text_len: int) -> Tensor:
    """Stack prompt embeddings [n_i, dim] into [B, text_len, dim], zero rows after each prompt.

    This is the DiT's text context: it pads with zeros and does not mask the padding.
    """
    embeds = list(embeds)
    if not embeds:
        raise ValueError("no prompt embeddings given; pass the list returned by TextEncoder.encode")
    if any(e.ndim != 2 for e in embeds):
        raise ValueError(f"prompt embeddings must be [tokens, dim], got shapes "
                         f"{[tuple(e.shape) for e in embeds]}")
    dim = embeds[0].shape[1]
    for i, e in enumerate(embeds):
        if e.shape[1] != dim:
            raise ValueError(f"prompt {i} has width {e.shape[1]}, prompt 0 has {dim}; all embeddings "
                             f"must come from the same text encoder")
        if e.shape[0] > text_len:
            raise ValueError(f"prompt {i} has {e.shape[0]} rows, more than text_len {text_len}; "
                             f"encode with a tokenizer whose text_len is at most the DiT's text_len")
    out = embeds[0].new_zeros(len(embeds), text_len, dim)  # [B, text_len, dim]
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out
