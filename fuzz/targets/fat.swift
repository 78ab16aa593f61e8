// libFuzzer target: the FAT12/16/32 reader on arbitrary bytes. It must never crash, trap, hang
// or allocate without bound: every malformed input is a thrown CairnError.
//
// Input encoding: the input is the first bytes of the volume. The volume is as long as the
// boot sector says (total sectors x bytes per sector, read from the input's BPB fields at 11,
// 19 and 32), but at most 64 MiB and never shorter than the input; everything past the input
// reads as zeros. A freshly made FAT volume is zero after its last written cluster, so
// fuzz/seeds.d/fat.sh cuts real mkfs.vfat + mcopy images down to their non-zero prefix.
//
// Builds either way: compiled into one module together with the CairnCore and GuestFS sources
// (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFAT(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let volume = FATFileSystem.fuzzVolume(Array(UnsafeRawBufferPointer(start: data, count: size)))
    _ = FATFileSystem.probe(volume)
    guard let fs = try? FATFileSystem(volume: volume) else { return 0 }
    exerciseFileSystem(fs)
    return 0
}
