#!/usr/bin/python3
"""A host for failover drills: writes stamped 4 KiB blocks through NBD with libnbd, one at a
time, and keeps the history outside geomirror. Before each write it logs "W block version",
after the server acknowledged it "A block version", which it also prints on standard output
for whoever waits on the progress. A block holds its number, its version
and the seed, a filler derived from them, and a CRC-32 of all that, so a checker can tell
every block's version from an image alone.

Usage: stamped_writer.py URI HISTORY SEED BLOCKS
Writes to blocks 0..BLOCKS-1 at random until the server goes away.
"""
import random
import struct
import sys
import zlib

import nbd

BLOCK = 4096


def stamped(block, version, seed):
    head = struct.pack(">QQQ", block, version, seed)
    filler = bytes((block * 31 + version * 7 + i) & 0xFF for i in range(BLOCK - len(head) - 4))
    body = head + filler
    return body + struct.pack(">I", zlib.crc32(body))


def main():
    uri, history, seed, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    version = {}
    with open(history, "a", buffering=1) as log:
        while True:
            b = rng.randrange(blocks)
            v = version.get(b, 0) + 1
            version[b] = v
            data = stamped(b, v, seed)
            log.write(f"W {b} {v}\n")
            try:
                h.pwrite(data, b * BLOCK)
            except nbd.Error as e:
                log.write(f"E {b} {v} {e}\n")
                return
            log.write(f"A {b} {v}\n")
            print(f"A {b} {v}", flush=True)


if __name__ == "__main__":
    main()
