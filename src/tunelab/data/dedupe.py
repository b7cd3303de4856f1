"""Exact and near-duplicate detection within a dataset and across its splits.

Exact duplicates share a `dedupe_key` (case, Unicode form, whitespace and edge punctuation ignored). Near duplicates
share most character shingles of that key: MinHash signatures and datasketch's `MinHashLSH` propose candidate pairs,
and every candidate is confirmed on the real shingle sets, so `threshold` is a true Jaccard similarity and a reported
pair always meets it. Recall is the probabilistic part: the LSH bands are chosen so that a pair exactly at the threshold
is proposed with probability >= 99.5% (pairs above it more often still).

    from tunelab.data.dedupe import exact_duplicates, near_duplicates, cross_split_matches
    twins = near_duplicates(texts)                              # twins[i] = earlier kept row, or None
    leaked = cross_split_matches(validation + test, train)      # leaked[i] = reference row that train[i] copies
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence

import numpy as np

# datasketch (with scipy: ~44 MB resident) is imported by the near-duplicate functions only: exact dedupe, which every
# training run does, needs none of it.

# Character 3-grams of the dedupe key. True Jaccard measured on 12 hand-written instructions of ~20 words (joined in twos
# and threes for 40 and 60 words) with every word in turn replaced by 3 others (2,178 pairs), a 447-character paragraph
# with one sentence appended, 125 pairs of rows from 6 templates (the ticket-extraction one, "Translate to French: ...",
# "What is the capital of ...?", ...) and 3 pairs that only swap two words ("Convert 12 USD to EUR" / "12 EUR to USD"):
#
#   shingles   one word changed in 20 / 40 / 60 words    sentence   template rows           order swapped
#              (lowest J, share >= 0.85)                  appended   highest / median / >=.85
#   char 3     0.79  92% / 0.89 100% / 0.92 100%         0.92       0.82 / 0.45 / 0         0.65-0.88
#   char 4     0.78  80% / 0.88 100% / 0.92 100%         0.91       0.78 / 0.42 / 0         0.44-0.76
#   char 5     0.77  61% / 0.88 100% / 0.92 100%         0.92       0.75 / 0.40 / 0         0.26-0.66
#   char 6     0.75  41% / 0.87 100% / 0.91 100%         0.92       0.71 / 0.38 / 0         0.23-0.59
#   char 7     0.74  20% / 0.86 100% / 0.91 100%         0.92       0.69 / 0.37 / 0         0.20-0.52
#   word 1     0.89 100% / 0.94 100% / 0.96 100%         0.91       0.76 / 0.42 / 0         1.00-1.00
#   word 2     0.80  12% / 0.90 100% / 0.93 100%         0.92       0.67 / 0.30 / 0         0.14-0.43
#   word 3     0.70  10% / 0.85 100% / 0.90 100%         0.92       0.60 / 0.27 / 0         0.00-0.29
#
# Only short shingles keep a ~20-word text with one word replaced at >= 0.85: a changed word of L letters changes about
# L + n - 1 of its ~120 shingles. Word 1-grams catch them all but are a bag of words, so "12 USD to EUR" and "12 EUR to
# USD" are identical (1.0 at any threshold). Char 3-grams are the best character size: 92% of the 20-word pairs (the
# misses replace a long word, e.g. "professional" -> "minutes") and every 40+ word pair, while no template pair reaches
# 0.85. The cost: unrelated 1-3k character prose shares more 3-grams (median 0.24 vs 0.08 for 5-grams), still far below.
# At most 3: the exact check packs a shingle's code points (21 bits each) into one uint64 (see `_packed_shingles`).
SHINGLE_SIZE = 3

# A pair exactly at the threshold must be proposed by the LSH index with at least this probability. Candidates are
# verified exactly, so a generous index costs only verification time (see `_lsh_bands`).
_MIN_RECALL_AT_THRESHOLD = 0.995
# A proposed pair whose signatures agree in fewer slots than a pair at the threshold would with this probability is
# rejected before the exact check (see `_min_agreeing_slots`).
_ESTIMATE_REJECTION_RISK = 1e-6

# Categories removed from words by `dedupe_key`: control, format (zero-width spaces, joiners, BOM) and lone surrogates.
# Removing every control character also guarantees that a key never holds U+0000, which `_packed_shingles` relies on.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs"})
_ASCII_PUNCTUATION = frozenset(chr(code) for code in range(128) if unicodedata.category(chr(code)).startswith("P"))
_BITS_PER_CODE_POINT = 21  # sys.maxunicode < 2**21

assert SHINGLE_SIZE * _BITS_PER_CODE_POINT <= 64, "the exact shingle check packs a shingle into one uint64"


def dedupe_key(text: str) -> str:
    """The text as compared for exact duplicates: NFKC, casefolded, whitespace collapsed to single spaces, invisible
    characters (format, control and surrogate code points) removed and punctuation stripped from both ends of each
    word; words made only of punctuation disappear.

    "Hello,  World!" and "hello world" share a key; so do "", "   " and "!!!" (no words at all).
    """
    # NFKC again after casefold: folding can produce characters that NFKC would rewrite (Unicode's NFKC_Casefold).
    normalized = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    words = []
    for raw_word in normalized.split():
        # isprintable() is False exactly when a word holds an "Other" code point (Cc, Cf, Cs, Co, Cn): a C-speed test
        # that spares the per-character look-up for almost every word.
        word = raw_word
        if not word.isprintable():
            word = "".join(char for char in word if unicodedata.category(char) not in _INVISIBLE)
        start, end = 0, len(word)
        while start < end and _is_punctuation(word[start]):
            start += 1
        while end > start and _is_punctuation(word[end - 1]):
            end -= 1
        if start < end:
            words.append(word[start:end])
    return " ".join(words)


def shingles(text: str, n: int = SHINGLE_SIZE) -> set[str]:
    """Character n-grams of `dedupe_key(text)`; a key shorter than `n` is one shingle, an empty key has none.

    Raises:
        ValueError: if `n` is smaller than 1.
    """
    if n < 1:
        raise ValueError(f"shingle size must be at least 1, got {n}")
    key = dedupe_key(text)
    if len(key) <= n:
        return {key} if key else set()
    return {key[start : start + n] for start in range(len(key) - n + 1)}


def exact_duplicates(texts: Sequence[str]) -> list[int | None]:
    """For each text, the index of the first earlier text with the same `dedupe_key`, else None.

    Every repeat points at the first occurrence, so keeping the rows whose entry is None keeps the first of each group.
    """
    first_index_of_key: dict[str, int] = {}
    duplicate_of: list[int | None] = []
    for index, text in enumerate(texts):
        key = dedupe_key(text)
        duplicate_of.append(first_index_of_key.get(key))
        first_index_of_key.setdefault(key, index)
    return duplicate_of


def near_duplicates(texts: Sequence[str], threshold: float = 0.85, num_perm: int = 128, seed: int = 1) -> list[int | None]:
    """For each text, the index of an earlier *kept* text whose shingle Jaccard similarity is >= `threshold`, else None.

    Keep-first and greedy: texts are visited in order, and a text is kept (entry None) only if it matches no earlier
    kept text; of several matching kept texts the earliest is reported. A text that is itself a duplicate is never
    used as a representative, so chains do not form: if B is a twin of A and C a twin of B but not of A, C is kept
    (dropping B already removed the link). Keeping the rows whose entry is None therefore keeps the first row of every
    group. Exact duplicates (same key) are reported too, having similarity 1; texts with an empty key (empty,
    whitespace, punctuation only) are never near duplicates of anything: use `exact_duplicates` for those.

    A reported pair always meets the threshold; a pair exactly at it is found with probability >= 99.5% (at 0.85 and
    128 permutations: 99.9%; at similarity 0.9: 99.999%). The result depends only on the arguments.

    Raises:
        ValueError: if `threshold` is not in (0, 1] or `num_perm` is smaller than 2.
    """
    _check_parameters(threshold, num_perm)
    keys = [dedupe_key(text) for text in texts]
    signatures = _signatures(keys, num_perm, seed)
    from datasketch import MinHashLSH

    index = MinHashLSH(num_perm=num_perm, params=_lsh_bands(threshold, num_perm))
    min_agreeing = _min_agreeing_slots(threshold, num_perm)
    kept_shingles: dict[int, np.ndarray] = {}
    representative_of_key: dict[str, int] = {}
    duplicate_of: list[int | None] = []
    for position, key in enumerate(keys):
        if not key:
            duplicate_of.append(None)
            continue
        if key in representative_of_key:
            # Same shingles as that earlier text, so the same earliest kept text matches (or that text itself, if kept).
            duplicate_of.append(representative_of_key[key])
            continue
        signature = _lean_minhash(signatures[position], seed)
        proposed = _plausible(index.query(signature), signatures, signatures[position], min_agreeing)
        twin = _first_verified_match(_shingle_set(key), proposed, keys, kept_shingles, threshold) if proposed else None
        duplicate_of.append(twin)
        representative_of_key[key] = position if twin is None else twin
        if twin is None:
            index.insert(position, signature, check_duplication=False)
    return duplicate_of


def cross_split_matches(
    reference: Sequence[str], candidates: Sequence[str], threshold: float | None = 0.85, num_perm: int = 128, seed: int = 1
) -> list[int | None]:
    """For each candidate, the index of a reference text it duplicates, else None.

    An exact twin (same `dedupe_key`, empty keys included) wins and the first such reference is reported; otherwise,
    when `threshold` is not None, the first reference whose shingle Jaccard similarity is >= `threshold` (a candidate
    with an empty key has no near twins). Used to find training rows that leak into evaluation: `reference` =
    validation + test texts, `candidates` = training texts. Near matches have the recall of `near_duplicates`.

    Raises:
        ValueError: if `threshold` is not None and not in (0, 1], or `num_perm` is smaller than 2.
    """
    reference_keys = [dedupe_key(text) for text in reference]
    first_reference_of_key: dict[str, int] = {}
    for position, key in enumerate(reference_keys):
        first_reference_of_key.setdefault(key, position)
    candidate_keys = [dedupe_key(text) for text in candidates]
    matches: list[int | None] = [first_reference_of_key.get(key) for key in candidate_keys]
    if threshold is None:
        return matches
    _check_parameters(threshold, num_perm)
    unmatched = [position for position, match in enumerate(matches) if match is None and candidate_keys[position]]
    if not unmatched:
        return matches
    # Only the first reference of each key can be reported, so later exact repeats need not be indexed.
    indexed = sorted(position for key, position in first_reference_of_key.items() if key)
    reference_signatures = np.zeros((len(reference), num_perm), dtype=np.uint32)
    reference_signatures[indexed] = _signatures([reference_keys[position] for position in indexed], num_perm, seed)
    from datasketch import MinHashLSH

    index = MinHashLSH(num_perm=num_perm, params=_lsh_bands(threshold, num_perm))
    for position in indexed:
        index.insert(position, _lean_minhash(reference_signatures[position], seed), check_duplication=False)
    min_agreeing = _min_agreeing_slots(threshold, num_perm)
    reference_shingles: dict[int, np.ndarray] = {}
    candidate_signatures = _signatures([candidate_keys[position] for position in unmatched], num_perm, seed)
    for position, signature in zip(unmatched, candidate_signatures):
        proposed = _plausible(index.query(_lean_minhash(signature, seed)), reference_signatures, signature, min_agreeing)
        if proposed:
            own = _shingle_set(candidate_keys[position])
            matches[position] = _first_verified_match(own, proposed, reference_keys, reference_shingles, threshold)
    return matches


def _is_punctuation(char: str) -> bool:
    if char.isascii():
        return char in _ASCII_PUNCTUATION
    return unicodedata.category(char).startswith("P")


def _check_parameters(threshold: float, num_perm: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1] (a Jaccard similarity), got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be at least 2, got {num_perm}")


def _packed_shingles(key: str) -> np.ndarray:
    """One uint64 per shingle position of a non-empty key: the shingle's code points, 21 bits each.

    Exact: distinct shingles pack to distinct numbers. A key shorter than `SHINGLE_SIZE` is one shorter "shingle",
    which cannot pack to the value of a full one because no key holds U+0000 (a full shingle's first code point is
    non-zero in the top bits).
    """
    code_points = np.frombuffer(key.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    width = min(SHINGLE_SIZE, len(code_points))
    count = len(code_points) - width + 1
    packed = np.zeros(count, dtype=np.uint64)
    for offset in range(width):
        packed = (packed << np.uint64(_BITS_PER_CODE_POINT)) | code_points[offset : offset + count]
    return packed


def _shingle_set(key: str) -> np.ndarray:
    """`shingles()` of a key as a sorted array of packed shingles (about 8 bytes per shingle instead of 80)."""
    return np.unique(_packed_shingles(key))


def _first_verified_match(
    own: np.ndarray, proposed: list[int], keys: Sequence[str], shingle_cache: dict[int, np.ndarray], threshold: float
) -> int | None:
    """The smallest proposed index whose shingle set (`_shingle_set(keys[index])`, cached) is `threshold`-similar."""
    for other in sorted(proposed):
        if other not in shingle_cache:
            shingle_cache[other] = _shingle_set(keys[other])
        theirs = shingle_cache[other]
        shared = np.intersect1d(own, theirs, assume_unique=True).size
        if shared / (own.size + theirs.size - shared) >= threshold:
            return other
    return None


def _min_agreeing_slots(threshold: float, num_perm: int) -> int:
    """The fewest agreeing signature slots a proposed pair needs before its shingle sets are compared exactly.

    For a pair exactly at `threshold` each slot agrees with probability `threshold`, so the count is binomial; the cut is
    the largest count below which such a pair falls with probability <= `_ESTIMATE_REJECTION_RISK` (for 0.85 and 128
    permutations: 87 slots, an estimate of 0.68). Template rows that LSH proposes at similarity ~0.5-0.7 are then
    rejected without building their sets.
    """
    if threshold >= 1.0:
        return num_perm  # identical shingle sets give identical signatures
    cumulative = 0.0
    for agreeing in range(num_perm + 1):
        # Binomial probability in log space: math.comb(1100, 550) alone would overflow a float.
        log_probability = (
            math.lgamma(num_perm + 1)
            - math.lgamma(agreeing + 1)
            - math.lgamma(num_perm - agreeing + 1)
            + agreeing * math.log(threshold)
            + (num_perm - agreeing) * math.log1p(-threshold)
        )
        cumulative += math.exp(log_probability)
        if cumulative > _ESTIMATE_REJECTION_RISK:
            return agreeing
    return num_perm


def _plausible(proposed: list[int], signatures: np.ndarray, signature: np.ndarray, min_agreeing: int) -> list[int]:
    """The proposed indices whose signature agrees with `signature` in at least `min_agreeing` slots."""
    if not proposed:
        return []
    proposed_array = np.asarray(proposed)
    agreeing = (signatures[proposed_array] == signature).sum(axis=1)
    return proposed_array[agreeing >= min_agreeing].tolist()


def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with the most rows per band -- fewest false candidates -- that still proposes a pair at
    exactly `threshold` with probability >= `_MIN_RECALL_AT_THRESHOLD`.

    For 0.85 and 128 permutations: 18 bands of 7 rows, missing a pair at 0.85 with probability 0.1% (at 0.9: 0.001%)
    and proposing a pair at 0.5 with probability 13%.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm // 2 + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= _MIN_RECALL_AT_THRESHOLD:
            best = (bands, rows)
    return best


def _lean_minhash(signature: np.ndarray, seed: int):
    from datasketch import LeanMinHash

    return LeanMinHash(seed=seed, hashvalues=signature, scheme="affine32")


def _signatures(keys: Sequence[str], num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures (one uint32 row per key) of the keys' shingle sets, computed in numpy.

    Bit-for-bit what `datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=int).update_batch(_shingle_hashes(key))`
    gives (the "affine32" scheme: MurmurHash3 finalizer, then `a * h + b mod 2^32`, minimum per permutation), without a
    Python call per shingle. An empty key gets the all-max signature of an empty MinHash.
    """
    from datasketch import MinHash

    permutation_a, permutation_b = MinHash(num_perm=num_perm, seed=seed).permutations
    signatures = np.full((len(keys), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    for position, key in enumerate(keys):
        if not key:
            continue
        mixed = _fmix32(_shingle_hashes(key))
        # One (shingle positions x permutations) block per key: ~300 x 128 uint32 for a 300-character row.
        signatures[position] = (mixed[:, None] * permutation_a[None, :] + permutation_b[None, :]).min(axis=0)
    return signatures


def _shingle_hashes(key: str) -> np.ndarray:
    """32-bit hashes of a non-empty key's packed shingles: the high half of the MurmurHash3 64-bit finalizer."""
    mixed = _packed_shingles(key)
    mixed ^= mixed >> np.uint64(33)
    mixed *= np.uint64(0xFF51AFD7ED558CCD)
    mixed ^= mixed >> np.uint64(33)
    mixed *= np.uint64(0xC4CEB9FE1A85EC53)
    mixed ^= mixed >> np.uint64(33)
    return (mixed >> np.uint64(32)).astype(np.uint32)


def _fmix32(hashes: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer, as datasketch applies it before its "affine32" permutations."""
    hashes = hashes ^ (hashes >> np.uint32(16))
    hashes = hashes * np.uint32(0x85EBCA6B)
    hashes = hashes ^ (hashes >> np.uint32(13))
    hashes = hashes * np.uint32(0xC2B2AE35)
    return hashes ^ (hashes >> np.uint32(16))
