"""Long captions: kohya's ``max_token_length`` (75, 150 or 225 tokens) as chunks of CLIP's 77.

CLIP reads 77 tokens: <BOS>, 75 tokens, <EOS>. For a longer limit kohya tokenizes the caption to
``max_token_length + 2`` tokens, cuts it into chunks of 75, encodes each chunk as its own
<BOS> ... <EOS> sequence, and joins the hidden states back: the first chunk's <BOS>, the 75 middle
states of every chunk, the last chunk's final state (2 + 75 x chunks states in all). SDXL's pooled
embedding is the first chunk's.
"""
from __future__ import annotations

import torch

MAX_TOKEN_LENGTHS = (75, 150, 225)


def chunk_ids(tokenizer, captions: list[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids shaped (batch, chunks, 77), as kohya's tokenize strategy makes them."""
    window = tokenizer.model_max_length  # 77
    if max_token_length + 2 <= window:
        ids = tokenizer(captions, padding="max_length", max_length=window, truncation=True, return_tensors="pt").input_ids
        return ids[:, None]
    total = max_token_length + 2
    ids = tokenizer(captions, padding="max_length", max_length=total, truncation=True, return_tensors="pt").input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, total - window + 2, window - 2):
        chunk = torch.cat([ids[:, :1], ids[:, start:start + window - 2], ids[:, -1:]], dim=1)
        if pad != eos:  # SDXL's second tokenizer pads with its own token: every chunk still ends in <EOS>
            chunk[(chunk[:, -2] != eos) & (chunk[:, -2] != pad), -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def join_chunks(hidden: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """Hidden states of (batch x chunks, 77, d) -> (batch, 2 + 75 x chunks, d); one chunk is left as is."""
    if chunks == 1:
        return hidden
    window = hidden.shape[1]
    hidden = hidden.reshape(batch, chunks * window, hidden.shape[-1])
    parts = [hidden[:, :1]] + [hidden[:, i:i + window - 2] for i in range(1, chunks * window, window)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)


def token_count(tokenizer, caption: str) -> int:
    """Tokens of a caption without <BOS>/<EOS>."""
    return len(tokenizer(caption, truncation=False).input_ids) - 2
