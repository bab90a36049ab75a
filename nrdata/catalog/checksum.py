"""CRC-32 of latent bytes (zlib's: `crc32(data, crc) == zlib.crc32(data, crc)`), callable from
compiled code.

The loader checks every row it reads against the checksum the writer recorded, inside its compiled
pass, so the check has to be nopython code and about as fast as reading the bytes: zlib.crc32 is
neither (a Python call per row, and 1-2 GB/s), and a table-driven CRC in numba is slower still.
On x86 with PCLMULQDQ the bulk of a row is folded 64 bytes at a time with carry-less
multiplications (Intel, "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ", 2009;
the constants are those of Linux's crc32-pclmul_asm.S for the reflected polynomial 0xEDB88320),
several times faster than zlib. Elsewhere the same function is a table-driven loop.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic


def _table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _table()
_ONES = np.uint32(0xFFFFFFFF)


def _has_pclmul() -> bool:
    """True when numba compiles for this host and the host has carry-less multiplication."""
    if platform.machine().lower() not in ("x86_64", "amd64") or config.CPU_NAME not in (None, "host"):
        return False
    if config.CPU_FEATURES is not None:  # an explicit feature list (portable caches): trust only it
        return "+pclmul" in config.CPU_FEATURES
    from llvmlite import binding

    try:
        return bool(binding.get_host_cpu_features().get("pclmul"))
    except RuntimeError:
        return False


HAS_PCLMUL = _has_pclmul()

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V2 = ir.VectorType(_I64, 2)


def _pclmul(builder):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V2, [_V2, _V2, _I8]), "llvm.x86.pclmulqdq")


def _pair(lo: int, hi: int) -> ir.Constant:
    return ir.Constant(_V2, [ir.Constant(_I64, lo), ir.Constant(_I64, hi)])


@intrinsic
def _clmul(typingctx, a, b):
    """The 128-bit carry-less product of two 64-bit words, as (low, high)."""
    sig = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        undef = ir.Constant(_V2, ir.Undefined)
        va, vb = (builder.insert_element(undef, x, ir.Constant(_I32, 0)) for x in args)
        product = builder.call(_pclmul(builder), [va, vb, ir.Constant(_I8, 0)])
        return context.make_tuple(builder, signature.return_type,
                                  [builder.extract_element(product, ir.Constant(_I32, k)) for k in (0, 1)])

    return sig, codegen


@intrinsic
def _fold(typingctx, data, nbytes, state):
    """The first `nbytes` bytes of `data` (at least 64, a multiple of 16) folded into 128 bits, the
    running CRC state xor-ed into the first word. Written as LLVM IR so that the four accumulators
    stay in vector registers (numba would move them through general registers at every step)."""
    sig = types.UniTuple(types.uint64, 2)(data, types.intp, types.uint64)

    def codegen(context, builder, signature, args):
        base = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data,
                               _I8.as_pointer())
        n = args[1]
        clmul = _pclmul(builder)

        def load(offset):
            return builder.load(builder.bitcast(builder.gep(base, [offset]), _V2.as_pointer()), align=1)

        def fold(x, k, more):  # x * (x^(d+64), x^d) mod P, plus the next block
            low = builder.call(clmul, [x, k, ir.Constant(_I8, 0x00)])
            high = builder.call(clmul, [x, k, ir.Constant(_I8, 0x11)])
            return builder.xor(builder.xor(low, high), more)

        def const(v):
            return ir.Constant(_I64, v)

        by_64 = _pair(0x154442BD4, 0x1C6E41596)  # fold across 512 bits
        by_16 = _pair(0x1751997D0, 0x0CCAA009E)  # fold across 128 bits
        acc = [cgutils.alloca_once(builder, _V2) for _ in range(4)]
        seed = builder.insert_element(_pair(0, 0), args[2], ir.Constant(_I32, 0))
        builder.store(builder.xor(load(const(0)), seed), acc[0])
        for k in (1, 2, 3):
            builder.store(load(const(16 * k)), acc[k])
        blocks = builder.udiv(n, const(64))
        with cgutils.for_range(builder, builder.sub(blocks, const(1))) as loop:
            at = builder.mul(builder.add(loop.index, const(1)), const(64))
            for k in range(4):
                builder.store(fold(builder.load(acc[k]), by_64, load(builder.add(at, const(16 * k)))), acc[k])
        x = builder.load(acc[0])
        for k in (1, 2, 3):
            x = fold(x, by_16, builder.load(acc[k]))
        builder.store(x, acc[0])
        done = builder.mul(blocks, const(64))
        with cgutils.for_range(builder, builder.udiv(builder.sub(n, done), const(16))) as loop:
            at = builder.add(done, builder.mul(loop.index, const(16)))
            builder.store(fold(builder.load(acc[0]), by_16, load(at)), acc[0])
        x = builder.load(acc[0])
        return context.make_tuple(builder, signature.return_type,
                                  [builder.extract_element(x, ir.Constant(_I32, k)) for k in (0, 1)])

    return sig, codegen


_K4 = np.uint64(0x0CCAA009E)
_K5 = np.uint64(0x163CD6124)
_POLY, _MU = np.uint64(0x1DB710641), np.uint64(0x1F7011641)  # P(x) and floor(x^64 / P(x)), bit-reflected
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


@njit(cache=True, nogil=True, boundscheck=False)
def _bytewise(data, start, state):
    table = _TABLE
    for i in range(start, data.shape[0]):
        state = table[(state ^ data[i]) & 0xFF] ^ (state >> 8)
    return state


@njit(cache=True, nogil=True, boundscheck=False)
def crc32_table(data, crc):
    """zlib.crc32(data, crc) of a uint8 array, one byte at a time (any CPU)."""
    return _bytewise(data, 0, np.uint32(crc) ^ _ONES) ^ _ONES


@njit(cache=True, nogil=True, boundscheck=False)
def crc32_pclmul(data, crc):
    """zlib.crc32(data, crc) of a uint8 array, folded with PCLMULQDQ (x86 only)."""
    n = data.shape[0]
    state = np.uint32(crc) ^ _ONES
    if n < 64:
        return _bytewise(data, 0, state) ^ _ONES
    bulk = n - n % 16
    lo, hi = _fold(data, bulk, np.uint64(state))
    # 128 -> 64 bits (the 32 zero bits a CRC appends come in here), then 64 -> 32 bits
    x0, x1 = _clmul(lo, _K4)
    lo, hi = x0 ^ hi, x1
    shifted_lo, shifted_hi = (lo >> _SHIFT32) | (hi << _SHIFT32), hi >> _SHIFT32
    x0, x1 = _clmul(lo & _LOW32, _K5)
    lo = x0 ^ shifted_lo
    # Barrett reduction modulo P(x)
    q, _ = _clmul(lo & _LOW32, _MU)
    r, _ = _clmul(q & _LOW32, _POLY)
    state = np.uint32(((r ^ lo) >> _SHIFT32) & _LOW32)
    return _bytewise(data, bulk, state) ^ _ONES


# zlib.crc32(data, crc) of a uint8 array, callable from nopython code: the fastest this host has
crc32 = crc32_pclmul if HAS_PCLMUL else crc32_table


# -- joining checksums: the CRC of a+b from the CRCs of a and b (zlib's crc32_combine) -----------
#
# A shard keeps the CRC of each half of a row (latent, twin) and the index the CRC of the two
# chained; the loader checks the half it reads against the shard and the halves against the index
# with `crc32_combine_op`, without reading the other half.

_POLY_REFLECTED = np.uint32(0xEDB88320)


@njit(cache=True, nogil=True)
def _multmodp(a, b):
    """a(x) * b(x) modulo P(x), bit-reflected (zlib's multmodp)."""
    m = np.uint32(1 << 31)
    p = np.uint32(0)
    a, b = np.uint32(a), np.uint32(b)
    while m:
        if a & m:
            p ^= b
            if (a & (m - np.uint32(1))) == 0:
                break
        m >>= np.uint32(1)
        b = (b >> np.uint32(1)) ^ _POLY_REFLECTED if b & np.uint32(1) else b >> np.uint32(1)
    return p


@njit(cache=True, nogil=True)
def crc32_combine_gen(length):
    """The operator that appends `length` bytes to a CRC (x^(8 length) modulo P, zlib's crc32_combine_gen)."""
    p = np.uint32(1 << 31)  # x^0
    power = np.uint32(1 << 30)  # x^1, squared at every bit of 8 * length
    n = np.int64(length) * 8
    while n:
        if n & 1:
            p = _multmodp(power, p)
        power = _multmodp(power, power)
        n >>= 1
    return p


@njit(cache=True, nogil=True)
def crc32_combine_op(op, crc1, crc2):
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and op = crc32_combine_gen(len(b))."""
    return _multmodp(op, crc1) ^ np.uint32(crc2)
