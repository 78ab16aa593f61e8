// libFuzzer target: the XFS reader (GuestFS) on arbitrary volumes. It must never crash, trap,
// hang or allocate without bound: every malformed input is a thrown CairnError.
//
// Input encoding: XFS keeps its structures all over the volume (superblock and AG headers at
// the start of every AG, inode chunks and directory blocks after the log), so a real image is
// megabytes long but mostly zeros. The input is therefore a list of records, each a 4-byte
// big-endian sector number (modulo 131072) followed by 512 bytes of that sector's content; the
// volume is 64 MiB and every sector no record names reads as zeros. A later record for the
// same sector wins; a short last record is padded with zeros. fuzz/seeds.d/xfs.sh cuts real
// mkfs.xfs images into this form (every non-zero sector outside the log).
// Tests/GuestFSTests/XFS/XFSHostileTests.swift decodes the same encoding (XFSFuzzVolume).
//
// Builds either way: compiled into one module together with the CairnCore and GuestFS
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif


@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzXFS(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let volume = XFSFuzzVolume(Array(UnsafeRawBufferPointer(start: data, count: size)))
    _ = XFSFileSystem.probe(volume)
    guard let fs = try? XFSFileSystem(volume: volume) else { return 0 }
    exerciseFileSystem(fs)
    return 0
}
