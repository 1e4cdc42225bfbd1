"""Compiled (numba) inner loops of the streaming tokenizer's CSR fast path.

helical ranks a cell's genes with ``np.argsort(-values)``. Where a cell's values are all
distinct that order is the one descending order there is, so any exact sort gives it; where
two values tie, the order of the tied genes is whatever numpy's sort does, so only
``np.argsort`` itself gives it. The fast path therefore:

1. ``prepare``: normalises each cell's mapped genes (bit-for-bit numpy's arithmetic) and
   builds one uint64 sort key per gene: the value's bits inverted (descending), with the
   lowest ``b`` bits replaced by the gene's position in the cell (``b`` = bits that position
   needs). Keys are unique, so sorting them is exact and cheap (numpy's SIMD ``sort``).
2. the caller sorts each cell's keys (``ndarray.sort``, in place);
3. ``find_ties``: a cell whose sorted keys have two neighbours with equal upper bits has
   an exact tie (or values so close that the dropped bits decide): it is re-ranked with
   ``np.argsort(-values)``, exactly as helical;
4. ``emit``: tokens in rank order, truncated, with ``<cls>``/``<eos>`` when the model has them.

Any doubt (indices not sorted within a row, a value that is not finite) makes ``prepare``
return a status and the caller takes the general numpy path for that block.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK, UNSORTED, NEGATIVE, NOT_FINITE = 0, 1, 2, 3


def _jit(fn=None, **kw):
    """``njit`` with an on-disk cache where numba finds a writable place for one (next to
    this file, NUMBA_CACHE_DIR, or the user's cache folder); compiled per process otherwise."""
    if fn is None:
        return lambda f: _jit(f, **kw)
    try:
        return njit(cache=True, nogil=True, **kw)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True, **kw)(fn)


@_jit(inline="always")
def _index_bits(n):
    b = 1
    while (1 << b) < n:
        b += 1
    return b


@_jit
def prepare(indptr, indices, data, recip, tsum, colmap, rmed, tokens, check, row_ok,
            keys, neg, toks, out_ptr, forced):
    """Values and sort keys of the mapped genes of each row with ``row_ok``.

    ``indptr`` holds absolute offsets into ``indices``/``data``; outputs start at 0.
    ``data`` and ``recip`` share numpy's working dtype of ``data * (1 / n)`` (float32 or
    float64); ``tsum`` is 10000 in that dtype. ``neg`` receives ``-value`` (float64),
    ``toks`` the token of each kept gene, ``out_ptr`` the row offsets into them.
    ``forced[r]`` is set for rows whose order must come from ``np.argsort`` (non-finite
    values). Every stored value of the rows with ``check`` is validated. Returns a status:
    OK, UNSORTED (indices not strictly increasing in a row), NEGATIVE or NOT_FINITE.
    """
    n_rows = len(indptr) - 1
    fkeys = keys.view(np.float64)  # the value is written here, then turned into its key in place
    at = 0
    out_ptr[0] = 0
    for r in range(n_rows):
        forced[r] = False
        s = indptr[r]
        e = indptr[r + 1]
        if not check[r]:
            out_ptr[r + 1] = at
            continue
        ok = row_ok[r]
        rc = recip[r]
        b = _index_bits(e - s)  # bits for a position in the row (mapped genes are at most e - s)
        high = ~np.uint64((1 << b) - 1)
        start = at
        prev = -1
        for j in range(s, e):
            c = indices[j]
            x = data[j]
            if c <= prev:
                return UNSORTED
            if not np.isfinite(x):
                return NOT_FINITE
            if x < 0:
                return NEGATIVE
            prev = c
            p = colmap[c]
            if ok and p >= 0:
                v = np.float64((x * rc) * tsum) * rmed[p]
                neg[at] = -v
                toks[at] = tokens[p]
                fkeys[at] = v
                keys[at] = ((~keys[at]) & high) | np.uint64(at - start)
                if not np.isfinite(v):
                    forced[r] = True
                at += 1
        out_ptr[r + 1] = at
    return OK


@_jit
def find_ties(keys, out_ptr, rows, tied):
    """For each row in ``rows`` (keys sorted): set ``tied[r]`` when two neighbouring keys
    share their upper bits (an exact tie, or values the dropped bits would decide)."""
    n = 0
    for i in range(len(rows)):
        r = rows[i]
        s = out_ptr[r]
        e = out_ptr[r + 1]
        m = e - s
        low = np.uint64(1 << _index_bits(m))  # prepare may have used more bits; those are zero
        close = 0
        for k in range(s + 1, e):  # neighbours that differ only in the low b bits (vectorised)
            close += (keys[k] ^ keys[k - 1]) < low
        if close > 0:
            tied[r] = True
        if tied[r]:
            n += 1
    return n


@_jit
def emit(keys, order, toks, out_ptr, row_ok, tied, limit, special, cls, eos, flat, offsets, at, k):
    """Tokens of each kept row in rank order (from the sorted keys, or from ``order`` for
    tied rows), truncated to ``limit``, with ``cls``/``eos`` around them when ``special``,
    appended to ``flat`` from position ``at``; ``offsets[k + 1:]`` get the end of each kept
    row. Returns the new ``at``."""
    for r in range(len(out_ptr) - 1):
        if not row_ok[r]:
            continue
        s = out_ptr[r]
        m = out_ptr[r + 1] - s
        n = m if m < limit else limit
        if special:
            flat[at] = cls
            at += 1
        if tied[r]:
            for i in range(n):
                flat[at + i] = toks[s + order[s + i]]
        else:
            low = np.uint64((1 << _index_bits(m)) - 1)
            for i in range(n):
                flat[at + i] = toks[s + np.int64(keys[s + i] & low)]
        at += n
        if special:
            flat[at] = eos
            at += 1
        k += 1
        offsets[k] = at
    return at


def warm_up() -> None:
    """Load (or compile, the first time) every kernel for float32 and float64 values, so that
    forked workers inherit them ready instead of each loading them on first use."""
    indptr, indices = np.array([0, 2], dtype=np.int64), np.array([0, 1], dtype=np.int32)
    colmap, rmed, tokens = np.array([0, 1], np.int32), np.ones(2), np.array([5, 6], np.int32)
    ones = np.ones(1, dtype=np.bool_)
    for dt in (np.float32, np.float64):
        keys, neg, toks = np.empty(2, np.uint64), np.empty(2), np.empty(2, np.int32)
        out_ptr, forced = np.empty(2, np.int64), np.zeros(1, np.bool_)
        prepare(indptr, indices, np.ones(2, dt), np.ones(1, dt), dt(10000), colmap, rmed, tokens, ones, ones,
                keys, neg, toks, out_ptr, forced)
    keys.sort()
    find_ties(keys, out_ptr, np.zeros(1, np.int64), forced)
    emit(keys, np.zeros(2, np.int64), toks, out_ptr, ones, forced, 10, True, 1, 2, np.empty(4, np.int32),
         np.empty(2, np.int64), 0, 0)
