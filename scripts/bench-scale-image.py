#!/usr/bin/env python3
"""Writes scattered blocks of mixed-compressibility data into a sparse raw file,
so `qemu-img convert -O qcow2` of it gives an image whose L2 tables and refcount
blocks are interleaved with data across the written span (like a guest that
wrote there). Used by scripts/bench-scale.sh.

usage: bench-scale-image.py RAW SIZE SPAN EVERY BLOCK
  SIZE   virtual size in bytes (the file is truncated to it, sparse)
  SPAN   bytes from offset 0 over which blocks are written
  EVERY  one block per EVERY bytes (at a pseudo-random place inside each slot)
  BLOCK  bytes per block
"""
import os
import random
import sys


def corpus(n: int, rng: random.Random) -> bytes:
    # A third incompressible, a third text-like (base64-ish), a third mostly
    # zeroes with a few structures: roughly what a system disk's files
    # compress to with zstd -3 (~55-65%).
    parts = []
    third = n // 3
    parts.append(rng.randbytes(third))
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/ \n"
    parts.append(bytes(alphabet[b % len(alphabet)] for b in rng.randbytes(third)))
    z = bytearray(n - 2 * third)
    for i in range(0, len(z), 512):
        z[i : i + 16] = rng.randbytes(16)
    parts.append(bytes(z))
    return b"".join(parts)


def main() -> None:
    raw, size, span, every, block = sys.argv[1], *map(int, sys.argv[2:6])
    rng = random.Random(0x5CA1E)
    src = corpus(24 << 20, rng)
    with open(raw, "wb") as f:
        f.truncate(size)
        for slot in range(0, min(span, size), every):
            room = max(every - block, 0) // 65536
            off = slot + rng.randint(0, room) * 65536
            if off + block > size:
                break
            at = rng.randrange(0, len(src) - block, 4096)
            f.seek(off)
            f.write(src[at : at + block])
    os.sync()


if __name__ == "__main__":
    main()
