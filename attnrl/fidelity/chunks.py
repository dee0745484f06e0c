"""Chunk boundaries of a response: where `attnrl fidelity` cuts it to estimate prefix values.

A response of T tokens is cut at b_0 = 0 < b_1 < ... < b_K = T (K <= max_chunks):
- 'sentence': at sentence ends (attnrl.signals.receiver.sentence_spans); with more sentences
  than max_chunks, the K - 1 interior cuts are the sentence ends nearest to j T / K;
- 'tokens': equal token chunks, b_j = round(j T / K) (fewer when T < K);
- 'auto': sentences where the response has at least two, else equal token chunks.
Every chunk holds at least one token. Special tokens (EOS) are given as '' and so join the
sentence before them.
"""

from __future__ import annotations

CHUNKINGS = ("auto", "sentence", "tokens")


def token_bounds(length: int, max_chunks: int) -> list[int]:
    """[0, b_1, ..., T]: min(T, max_chunks) chunks of (nearly) equal token counts."""
    k = max(1, min(int(length), int(max_chunks)))
    return sorted({round(j * length / k) for j in range(k + 1)})


def sentence_bounds(sentence_ends: list[int], length: int, max_chunks: int) -> list[int]:
    """[0, ..., T] from the end positions of the sentences (exclusive ends, the last = T):
    all of them with at most max_chunks sentences, else the K - 1 interior ends nearest to
    the equal-token cuts j T / K (each end used once, in order)."""
    interior = sorted({int(e) for e in sentence_ends if 0 < int(e) < length})
    if len(interior) + 1 <= max_chunks:
        return [0, *interior, length]
    chosen: list[int] = []
    for j in range(1, max_chunks):
        target = j * length / max_chunks
        left = [e for e in interior if not chosen or e > chosen[-1]]
        # leave enough ends for the cuts still to make
        left = left[:len(left) - (max_chunks - 1 - j)] if max_chunks - 1 - j > 0 else left
        chosen.append(min(left, key=lambda e: (abs(e - target), e)))
    return [0, *chosen, length]


def chunk_bounds(token_texts: list[str], max_chunks: int, chunking: str = "auto") -> tuple[
        list[int], str]:
    """(bounds, how): the cut positions [0, ..., T] of a response given its tokens' texts,
    and 'sentence' or 'tokens' (which rule made them)."""
    from attnrl.signals.receiver import sentence_spans

    length = len(token_texts)
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
    if length == 0:
        return [0], "tokens"
    if chunking != "tokens":
        spans = sentence_spans(token_texts)
        if len(spans) >= 2 or chunking == "sentence":
            return sentence_bounds([end for _, end in spans], length, max_chunks), "sentence"
    return token_bounds(length, max_chunks), "tokens"


def chunk_index(bounds: list[int]) -> list[int]:
    """The chunk of every token: (T,) with chunk j on positions b_j .. b_{j+1} - 1."""
    out: list[int] = []
    for j in range(len(bounds) - 1):
        out += [j] * (bounds[j + 1] - bounds[j])
    return out
