"""Digests that prove a restored value equals the saved one.

`tree_digest` gives every array of a pytree two 32-bit hashes of its bits and
an all-finite flag, computed on the devices where the array lives. Each hash is
a sum over elements of a mixed (bits, global position) word, so it does not
depend on how the array is sharded: a checkpoint saved on one mesh verifies on
any other. A changed element changes its term through a bijective mixer, so any
single damaged word is always caught, and any other damage escapes both hashes
with probability about 2^-64.

Small, fully replicated leaves (norm scales, biases, counters: most of the leaves of a
convolutional model and its optimizer state) are digested together, one pass over
their concatenated words with per-leaf sums, so that a state of hundreds of leaves
traces and compiles as one reduction rather than hundreds. The figures are the
same as leaf by leaf.

`json_digest` covers the small JSON items saved beside the arrays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Odd constants of the murmur3 finaliser and the golden ratio, one pair per hash lane.
_LANES = ((0x9E3779B9, 0x85EBCA6B), (0x7FEB352D, 0xC2B2AE35))


def _mix(h: jax.Array, multiplier: int) -> jax.Array:
    """A bijection of uint32 words that spreads every input bit over the output (murmur3's finaliser)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(multiplier)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, one or more per element, in element order."""
    itemsize = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if itemsize == 8:  # two words per element
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _array_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(uint32[2] hashes, bool all-finite) of one array."""
    words = _words(x)
    position = jnp.arange(words.size, dtype=jnp.uint32)
    lanes = [jnp.sum(_mix(words + position * jnp.uint32(step), mul), dtype=jnp.uint32) for step, mul in _LANES]
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack(lanes), finite


@jax.jit
def _digests(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    return [_array_digest(x) for x in leaves]


# Exponent bits of the float formats that pack: all of them set means infinity or NaN.
_NONFINITE_BITS = {jnp.dtype(jnp.float32): 0x7F800000, jnp.dtype(jnp.bfloat16): 0x7F80, jnp.dtype(jnp.float16): 0x7C00}
PACKED_LEAF_BYTES = 1 << 20  # bigger leaves keep a pass of their own rather than being copied into the pack


def _packs(leaf: Any) -> bool:
    """Whether `leaf` is digested in the pack: small, one word per element, on every device whole."""
    if not isinstance(leaf, jax.Array) or leaf.nbytes > PACKED_LEAF_BYTES or not leaf.sharding.is_fully_replicated:
        return False
    dtype = jnp.dtype(leaf.dtype)
    exact = jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_
    return dtype in _NONFINITE_BITS or (exact and dtype.itemsize <= 4)


PACK_ROW_WORDS = 256  # each leaf's words start a new row of the pack; its last row is padded


@jax.jit
def _packed_digests(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(uint32[n, 2] hashes, bool[n] all-finite) of n one-word-per-element leaves, equal to `_array_digest`'s.

    The leaves' words are laid out as rows of PACK_ROW_WORDS, each row within one leaf; row
    sums are one reduction over the whole pack, and each leaf sums its rows (uint32 sums wrap
    the same in any order). What a word's term needs from its leaf (its position in it, the
    leaf's size and non-finite bit pattern) is per row, not per word.
    """
    words = [_words(x) for x in leaves]
    sizes = np.array([w.size for w in words], np.int64)
    rows = -(-sizes // PACK_ROW_WORDS)
    owner = np.repeat(np.arange(len(words)), rows)  # each row's leaf
    first_row = np.concatenate([[0], np.cumsum(rows)[:-1]])
    row_start = (np.arange(int(rows.sum())) - first_row[owner]) * PACK_ROW_WORDS  # its first word's position
    masks = np.array([_NONFINITE_BITS.get(jnp.dtype(x.dtype), 0) for x in leaves], np.uint32)

    pack = jnp.concatenate([jnp.pad(w, (0, int(r) * PACK_ROW_WORDS - w.size)) for w, r in zip(words, rows)])
    pack = pack.reshape(-1, PACK_ROW_WORDS)
    position = jnp.asarray(row_start, jnp.uint32)[:, None] + jnp.arange(PACK_ROW_WORDS, dtype=jnp.uint32)
    # Per-row constants: the barrier keeps XLA from folding them out into constants of the pack's size.
    position, size, mask = jax.lax.optimization_barrier(
        (position, jnp.asarray(sizes[owner], jnp.uint32)[:, None], jnp.asarray(masks[owner])[:, None]))
    real = position < size  # not padding

    def per_leaf(terms: jax.Array) -> jax.Array:
        by_row = jnp.sum(jnp.where(real, terms, jnp.uint32(0)), axis=1, dtype=jnp.uint32)
        return jax.ops.segment_sum(by_row, jnp.asarray(owner), len(words), indices_are_sorted=True)

    hashes = [per_leaf(_mix(pack + position * jnp.uint32(step), mul)) for step, mul in _LANES]
    nonfinite = (((pack & mask) == mask) & (mask != 0)).astype(jnp.uint32)
    return jnp.stack(hashes, axis=1), per_leaf(nonfinite) == 0


def _path_name(path) -> str:
    """'params/layers/attn/wq/kernel', 'opt_state/0/mu/embed': a leaf's place in the tree."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def start_tree_digest(tree: Any) -> Callable[[], dict[str, dict]]:
    """Dispatch the digests of `tree`'s arrays as they are now; the returned function waits for them.

    The computation is queued on the devices before anything that comes later
    (such as a train step that donates these arrays), so the caller may go on
    at once and fetch the result from any thread.
    """
    named = [(_path_name(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]
    # One computation per set of devices: a jitted computation cannot mix arrays from different ones.
    groups: dict[frozenset, list[tuple[str, jax.Array]]] = {}
    for name, leaf in named:
        devices = frozenset(leaf.sharding.device_set) if isinstance(leaf, jax.Array) else frozenset()
        groups.setdefault(devices, []).append((name, leaf))
    queued = []
    for members in groups.values():
        packed = [(name, leaf) for name, leaf in members if _packs(leaf)]
        alone = [(name, leaf) for name, leaf in members if not _packs(leaf)]
        if packed:
            queued.append((packed, _packed_digests([leaf for _, leaf in packed]), True))
        if alone:
            queued.append((alone, _digests([leaf for _, leaf in alone]), False))

    def result() -> dict[str, dict]:
        digests = {}
        for members, outputs, is_packed in queued:
            outputs = _host(outputs)
            per_leaf = zip(*outputs) if is_packed else outputs  # packed: (hashes [n, 2], finite [n])
            for (name, _), (hashes, finite) in zip(members, per_leaf):
                digests[name] = {"hash": [int(h) for h in hashes], "finite": bool(finite)}
        return {name: digests[name] for name, _ in named}

    return result


def tree_digest(tree: Any) -> dict[str, dict]:
    """{leaf path: {"hash": [h0, h1], "finite": bool}} for every array leaf, computed where the arrays live."""
    return start_tree_digest(tree)()


def _host(tree: Any) -> Any:
    """Fully replicated device values as numpy, also when other processes hold devices of the mesh."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def differing(saved: dict[str, dict], restored: dict[str, dict]) -> list[str]:
    """Paths whose restored digest differs from the saved one (only paths both sides have)."""
    return [path for path, digest in restored.items() if path in saved and saved[path]["hash"] != digest["hash"]]


def all_finite(tree: Any) -> jax.Array:
    """True when no floating-point leaf of `tree` holds a NaN or an infinity (traceable)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def json_digest(value: Any) -> str:
    """sha256 of a JSON value's canonical form."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
