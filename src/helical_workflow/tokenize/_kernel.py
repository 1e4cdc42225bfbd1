"""Compiled (numba) inner loops of the rank-value encoding's CSR fast path (:mod:`.rank`).

helical ranks a cell's genes with ``np.argsort(-values)``. Where a cell's values are all
distinct that order is the one descending order there is, so any exact sort gives it; where
two values tie, the order of the tied genes is whatever numpy's sort does, so only
``np.argsort`` itself gives it. The fast path therefore:

1. ``prepare``: normalises each cell's mapped genes (bit-for-bit numpy's arithmetic) and
   builds one uint32 sort key per gene: the value's leading bits (exponent relative to the
   cell's smallest, then as many mantissa bits as fit), inverted so that larger values come
   first, above the gene's position in the cell. Keys are unique, so numpy's SIMD ``sort``
   of 32-bit keys orders them, at half the cost of 64-bit ones.
2. the caller sorts each cell's keys (``ndarray.sort``, in place);
3. ``resolve``: neighbours whose value bits are equal (values closer than the kept bits
   tell apart) are put in exact order by their full values; a cell where two values are
   exactly equal is marked ``tied`` and re-ranked by the caller with ``np.argsort(-values)``,
   exactly as helical. The result is each cell's order of positions;
4. ``emit``: tokens in that order, truncated, with ``<cls>``/``<eos>`` when the model has them.

Any doubt (indices not sorted within a row, a value that is not finite) makes ``prepare``
return a status (or mark the cell for ``np.argsort``) and the caller takes the general
path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK, UNSORTED, NEGATIVE, NOT_FINITE = 0, 1, 2, 3
_SIGN = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


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
    """Bits that a position in a cell of n values needs (at least 1)."""
    b = 1
    while (1 << b) < n:
        b += 1
    return b


@_jit
def prepare(indptr, indices, data, recip, tsum, colmap, rmed, tokens, check, row_ok, keys, neg, toks, out_ptr, forced):
    """Values and sort keys of the mapped genes of each row with ``row_ok``.

    ``indptr`` holds absolute offsets into ``indices``/``data``; outputs start at 0.
    ``data`` and ``recip`` share numpy's working dtype of ``data * (1 / n)`` (float32 or
    float64); ``tsum`` is 10000 in that dtype. ``neg`` receives ``-value`` (float64, the
    array helical argsorts), ``toks`` the token of each kept gene, ``keys`` the uint32 keys,
    ``out_ptr`` the row offsets into them. ``forced[r]`` is set for rows whose order must
    come from ``np.argsort`` (non-finite values, or a range of values the keys cannot span).
    Every stored value of the rows with ``check`` is validated. Returns a status: OK,
    UNSORTED (indices not strictly increasing in a row), NEGATIVE or NOT_FINITE.
    """
    n_rows = len(indptr) - 1
    nbits = neg.view(np.uint64)
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
                at += 1
        out_ptr[r + 1] = at
        m = at - start
        if m == 0:
            continue
        lo = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        hi = np.uint64(0)
        for i in range(start, at):  # the value's bits: a positive float orders as its bits do
            b = nbits[i] & _SIGN
            lo = min(lo, b)
            hi = max(hi, b)
        if hi >= np.uint64(0x7FF0_0000_0000_0000):  # inf or nan
            forced[r] = True
            continue
        ib = _index_bits(m)
        vb = 32 - ib  # bits left for the value
        span = _index_bits(np.int64((hi >> np.uint64(52)) - (lo >> np.uint64(52))) + 1)  # exponent range
        mb = vb - span  # mantissa bits kept
        if mb < 4:
            forced[r] = True
            continue
        base = (lo >> np.uint64(52)) << np.uint64(52)
        shift = np.uint64(52 - mb)
        vmask = np.uint64((1 << vb) - 1)
        for i in range(start, at):
            up = ((nbits[i] & _SIGN) - base) >> shift  # monotone in the value, < 2**vb
            keys[i] = np.uint32((((~up) & vmask) << np.uint64(ib)) | np.uint64(i - start))
    return OK


@_jit
def resolve(keys, neg, out_ptr, rows, tied, order, scratch):
    """For each row in ``rows`` (keys sorted): the positions in rank order into ``order``;
    neighbours with equal value bits are ordered by their full values. A row with two
    exactly equal values (or flagged in ``tied`` already) is left ``tied``. ``scratch``
    holds at least as many int32 as the longest row. Returns the number of tied rows
    among ``rows``."""
    n_tied = 0
    for i in range(len(rows)):
        r = rows[i]
        if tied[r]:
            n_tied += 1
            continue
        s = out_ptr[r]
        e = out_ptr[r + 1]
        ib = np.uint32(_index_bits(e - s))
        imask = np.uint32((1 << ib) - 1)
        for j in range(s, e):
            order[j] = keys[j] & imask
        n_close = 0
        for j in range(s + 1, e):  # where a neighbour has the same value bits, branch-free
            scratch[n_close] = j
            n_close += (keys[j] >> ib) == (keys[j - 1] >> ib)
        c = 0
        while c < n_close:  # each run of such neighbours (mostly pairs): insertion sort by -value
            k = scratch[c] - 1
            q = scratch[c] + 1
            c += 1
            while c < n_close and scratch[c] == q:
                q += 1
                c += 1
            for a in range(k + 1, q):
                pos = order[a]
                w = neg[s + pos]
                t = a - 1
                while t >= k and neg[s + order[t]] > w:
                    order[t + 1] = order[t]
                    t -= 1
                order[t + 1] = pos
            for a in range(k + 1, q):
                if neg[s + order[a]] == neg[s + order[a - 1]]:
                    tied[r] = True
        if tied[r]:
            n_tied += 1
    return n_tied


@_jit
def emit(order, toks, out_ptr, row_ok, limit, special, cls, eos, flat, offsets, at, k):
    """Tokens of each kept row in ``order``, truncated to ``limit``, with ``cls``/``eos``
    around them when ``special``, appended to ``flat`` from position ``at``;
    ``offsets[k + 1:]`` get the end of each kept row. Returns the new ``at``."""
    for r in range(len(out_ptr) - 1):
        if not row_ok[r]:
            continue
        s = out_ptr[r]
        m = out_ptr[r + 1] - s
        n = m if m < limit else limit
        if special:
            flat[at] = cls
            at += 1
        for i in range(n):
            flat[at + i] = toks[s + order[s + i]]
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
        keys, neg, toks, order = np.empty(2, np.uint32), np.empty(2), np.empty(2, np.int32), np.empty(2, np.int32)
        out_ptr, forced = np.empty(2, np.int64), np.zeros(1, np.bool_)
        prepare(
            indptr,
            indices,
            np.ones(2, dt),
            np.ones(1, dt),
            dt(10000),
            colmap,
            rmed,
            tokens,
            ones,
            ones,
            keys,
            neg,
            toks,
            out_ptr,
            forced,
        )
    keys.sort()
    resolve(keys, neg, out_ptr, np.zeros(1, np.int64), forced, order, np.empty(2, np.int32))
    for flat_dtype in (np.uint16, np.int32):  # how tokens are stored
        emit(order, toks, out_ptr, ones, 10, True, 1, 2, np.empty(4, flat_dtype), np.empty(2, np.int64), 0, 0)
