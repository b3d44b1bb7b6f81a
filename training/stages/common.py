"""Pieces several stages share: the frozen text encoder, the prompt table, stage products.

Text encoder choice: a small umT5-layout encoder (:class:`sf_sdk.models.text.UMT5Encoder`) with
random weights drawn from ``teacher.text_seed`` and **frozen**. The domain has 15 distinct words
(``training.data.shapes.domain_words``); random embeddings already separate them and the
relative-position attention keeps their order, so the DiT's text embedding and cross-attention
learn the mapping. Freezing keeps the prompt embeddings a fixed function that can be encoded once
per run (``PromptTable``) and shipped as-is with the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sf_sdk.checkpoint import load_into, load_state_dict
from sf_sdk.config import DiTConfig, from_dict, to_dict
from sf_sdk.models.dit import WanDiT
from sf_sdk.models.text import (
    PromptTokenizer,
    TextEncoder,
    UMT5Encoder,
    build_word_tokenizer,
    pad_prompt_embeds,
)
from training.data.shapes import all_captions, domain_words
from training.utils.checkpoint import atomic_save_file
from training.utils.config import TrainConfig
from training.utils.dist import DistInfo, barrier

__all__ = ["PromptTable", "prepare_text_encoder", "load_text_encoder", "prompt_table",
           "save_dit", "load_dit", "text_dir"]

log = logging.getLogger(__name__)

TEXT_FILE = "text_encoder.safetensors"
DIT_FILE = "dit.safetensors"
DIT_CONFIG_FILE = "dit_config.json"


def text_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) / "text"


def prepare_text_encoder(cfg: TrainConfig, dist: DistInfo) -> Path:
    """Write the word tokenizer and the seeded frozen encoder once (rank 0); idempotent."""
    folder = text_dir(cfg)
    if dist.is_main and not (folder / TEXT_FILE).is_file():
        build_word_tokenizer(domain_words(), folder / "tokenizer")
        tok = PromptTokenizer(folder / "tokenizer", cfg.text.text_len)
        if tok.vocab_size > cfg.text.vocab:
            raise ValueError(f"the domain tokenizer has {tok.vocab_size} tokens, more than text.vocab="
                             f"{cfg.text.vocab}: raise text.vocab")
        gen_state = torch.get_rng_state()
        torch.manual_seed(cfg.teacher.text_seed)
        encoder = UMT5Encoder(cfg.text)
        torch.set_rng_state(gen_state)
        atomic_save_file(encoder.state_dict(), folder / TEXT_FILE, {"format": "sf-sdk"})
        log.info("text encoder: frozen random umT5 (%d parameters, seed %d)",
                 sum(p.numel() for p in encoder.parameters()), cfg.teacher.text_seed)
    barrier()
    return folder


def load_text_encoder(cfg: TrainConfig, device: torch.device) -> TextEncoder:
    folder = text_dir(cfg)
    encoder = UMT5Encoder(cfg.text)
    load_into(encoder, load_state_dict(folder / TEXT_FILE), what="text encoder", config=cfg.text)
    tok = PromptTokenizer(folder / "tokenizer", cfg.text.text_len)
    return TextEncoder(encoder, tok, device=device, cache_size=0)


@dataclass
class PromptTable:
    """Every caption of the domain encoded once: ``cond`` [N, text_len, text_dim] padded with zero
    rows to the DiT's ``text_len``, and ``uncond`` [1, text_len, text_dim], the unconditional
    context of classifier-free guidance: all zero rows (what the DiT pads any prompt with; the
    tokenizer rejects an empty prompt). Only training uses it: the student needs no guidance."""

    captions: list[str]
    cond: Tensor
    uncond: Tensor

    def index(self, caption: str) -> int:
        return self.captions.index(caption)

    def lookup(self, captions: list[str]) -> Tensor:
        return self.cond[[self.index(c) for c in captions]]  # [B, text_len, text_dim]


@torch.no_grad()
def prompt_table(cfg: TrainConfig, device: torch.device) -> PromptTable:
    if cfg.text.dim != cfg.dit.text_dim:
        raise ValueError(f"text.dim ({cfg.text.dim}) must equal dit.text_dim ({cfg.dit.text_dim})")
    encoder = load_text_encoder(cfg, device)
    captions = all_captions()
    cond = pad_prompt_embeds(encoder.encode(captions), cfg.dit.text_len)  # [N, text_len, text_dim]
    uncond = torch.zeros_like(cond[:1])  # [1, text_len, text_dim]
    return PromptTable(captions, cond.to(device), uncond.to(device))


def save_dit(folder: Path, state: dict[str, Tensor], dit_cfg: DiTConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_file(state, folder / DIT_FILE, {"format": "sf-sdk"})
    (folder / DIT_CONFIG_FILE).write_text(json.dumps(to_dict(dit_cfg), indent=2) + "\n")


def load_dit(folder: Path, device: torch.device, *, what: str) -> WanDiT:
    if not (folder / DIT_FILE).is_file():
        raise ValueError(f"{folder} holds no {what} DiT: run that stage first")
    dit_cfg = from_dict(DiTConfig, json.loads((folder / DIT_CONFIG_FILE).read_text()), source=folder / DIT_CONFIG_FILE)
    model = WanDiT(dit_cfg)
    load_into(model, load_state_dict(folder / DIT_FILE), what=what, config=dit_cfg)
    return model.to(device)
