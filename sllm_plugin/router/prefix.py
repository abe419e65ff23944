"""Prefix-cache affinity: which replica has recently seen the leading blocks of a prompt.

The router routes before any tokenizer runs, so a prompt is cut into fixed-size blocks of its
text (or of its token ids, when the client sent ids) and each block is hashed together with
everything before it, as vLLM's prefix cache chains its KV blocks. A replica's recent blocks
live in a bounded LRU; the hit fraction is the length of the request's leading run of known
blocks over its number of blocks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

BLOCK_CHARS = 256
BLOCK_TOKENS = 64


def prompt_blocks(prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
                  | Sequence[dict]) -> list[bytes]:
    """Chained block hashes of a completion prompt (text or ids) or chat messages; for a batch
    of prompts, those of the first (the request goes to one replica as a whole)."""
    if prompt and not isinstance(prompt, str) and isinstance(prompt[0], (str, list)):
        return prompt_blocks(prompt[0])  # type: ignore[arg-type]
    if isinstance(prompt, str):
        data, step = prompt.encode(), BLOCK_CHARS
    elif prompt and isinstance(prompt[0], dict):
        data = json.dumps([[m.get("role"), m.get("content")] for m in prompt],  # type: ignore[union-attr]
                          ensure_ascii=False).encode()
        step = BLOCK_CHARS
    else:
        data, step = b"".join(int(t).to_bytes(4, "little", signed=True) for t in prompt), \
            4 * BLOCK_TOKENS
    blocks, previous = [], b""
    for start in range(0, len(data) - step + 1, step):  # whole blocks only, as the KV cache
        previous = hashlib.blake2b(previous + data[start : start + step], digest_size=8).digest()
        blocks.append(previous)
    return blocks


class PrefixIndex:
    """Per replica, the block hashes it has recently served (bounded LRU)."""

    def __init__(self, capacity_blocks: int = 20000) -> None:
        self.capacity = capacity_blocks
        self._seen: dict[str, OrderedDict[bytes, None]] = {}
        self._lock = threading.Lock()

    def record(self, replica: str, blocks: list[bytes]) -> None:
        with self._lock:
            seen = self._seen.setdefault(replica, OrderedDict())
            for block in blocks:
                seen[block] = None
                seen.move_to_end(block)
            while len(seen) > self.capacity:
                seen.popitem(last=False)

    def hit_fraction(self, replica: str, blocks: list[bytes]) -> float:
        if not blocks:
            return 0.0
        with self._lock:
            seen = self._seen.get(replica)
            if not seen:
                return 0.0
            n = 0
            for block in blocks:
                if block not in seen:
                    break
                n += 1
        return n / len(blocks)

    def forget(self, replica: str) -> None:
        with self._lock:
            self._seen.pop(replica, None)
