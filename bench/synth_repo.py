#!/usr/bin/env python3
"""Writes a synthetic, unencrypted Cairn repository straight from docs/FORMAT.md.

    bench/synth_repo.py DIR CHUNKS [SNAPSHOTS]

CHUNKS distinct 64 KiB chunks (zeros with a counter in the first 8 bytes, zstd-compressed
through libzstd), half of them referenced by SNAPSHOTS snapshots (default 10) with one disk
each, the other half unreferenced (what gc would remove). Files are written without fsync: this
is a benchmark fixture, not a backup. Because it is written from the format document alone,
`cairn check --read-data` passing on it also checks that the document is complete.
"""
import ctypes, hashlib, json, os, struct, sys, datetime

CHUNK = 64 * 1024
zstd = ctypes.CDLL("libzstd.so.1")
zstd.ZSTD_compressBound.restype = ctypes.c_size_t
zstd.ZSTD_compress.restype = ctypes.c_size_t
zstd.ZSTD_compress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
zstd.ZSTD_isError.argtypes = [ctypes.c_size_t]
zstd.ZSTD_compressBound.argtypes = [ctypes.c_size_t]

def compress(data: bytes) -> bytes:
    bound = zstd.ZSTD_compressBound(len(data))
    out_buf = ctypes.create_string_buffer(bound)
    n = zstd.ZSTD_compress(out_buf, bound, data, len(data), 1)
    if zstd.ZSTD_isError(n):
        raise RuntimeError("zstd failed")
    return out_buf.raw[:n]

def envelope(kind: int, plain: bytes) -> bytes:
    packed = compress(plain)
    comp = 1 if len(packed) < len(plain) else 0
    payload = packed if comp else plain
    header = b"CRNO" + bytes([1, kind, comp, 0]) + struct.pack("<QQQ", len(plain), len(payload), 0)
    return header + payload

def put(path: str, data: bytes):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)

def main():
    root, n = sys.argv[1], int(sys.argv[2])
    snaps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    if os.path.exists(os.path.join(root, "config")):
        sys.exit(f"{root}: a repository already exists")
    for ns in ["chunks", "indexes", "snapshots", "keys", "locks", "tmp"]:
        os.makedirs(os.path.join(root, ns), exist_ok=True)
    for ns in ["chunks", "indexes"]:
        for b in range(256):
            os.makedirs(os.path.join(root, ns, "%02x" % b), exist_ok=True)
    ids = []
    base = bytearray(CHUNK)
    for i in range(n):
        struct.pack_into("<Q", base, 0, i + 1)
        plain = bytes(base)
        cid = hashlib.sha256(plain).hexdigest()
        put(os.path.join(root, "chunks", cid[:2], cid), envelope(1, plain))
        ids.append(cid)
    referenced = ids[: n // 2]
    per = max(1, len(referenced) // snaps)
    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    for s in range(snaps):
        part = referenced[s * per:(s + 1) * per] if s < snaps - 1 else referenced[s * per:]
        size = len(part) * CHUNK
        index = b"CAIRNIDX" + struct.pack("<IIQII", 1, 64, size, CHUNK, 0) + struct.pack("<Q", len(part)) + bytes(24)
        index += b"".join(bytes.fromhex(c) for c in part)
        iid = hashlib.sha256(index).hexdigest()
        put(os.path.join(root, "indexes", iid[:2], iid), envelope(2, index))
        manifest = {
            "chunkSize": CHUNK, "consistency": "crash", "host": "synth", "tags": [], "toolVersion": "synth_repo.py",
            "time": (t0 + datetime.timedelta(hours=s)).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "version": 1, "vm": f"vm{s}",
            "disks": [{"name": "disk0", "virtualSize": size, "sourceFormat": "raw", "sourcePath": "synthetic", "index": iid,
                       "chunks": len(part), "bytesRead": size, "bytesNew": size, "bytesDeduplicated": 0,
                       "bytesZero": 0, "bytesStored": 0}],
        }
        plain = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        mid = hashlib.sha256(plain).hexdigest()
        put(os.path.join(root, "snapshots", mid), envelope(3, plain))
    config = {"chunkSize": CHUNK, "compression": "zstd", "compressionLevel": 1, "encryption": "none",
              "id": hashlib.sha256(root.encode()).hexdigest(), "version": 1}
    put(os.path.join(root, "config"), json.dumps(config, indent=2, sort_keys=True).encode())

if __name__ == "__main__":
    main()
