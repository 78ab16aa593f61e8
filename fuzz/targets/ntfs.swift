// libFuzzer target: the NTFS reader on arbitrary volumes. It must never crash, trap, hang or
// allocate without bound: every malformed input is a thrown CairnError.
//
// Input encoding (NTFSFuzzInput in Sources/GuestFS/NTFS/NTFSFuzzInput.swift): a u32 LE volume
// size (clamped to 4 KiB ... 64 MiB), then records of a u16 LE page number and up to 4096 bytes
// of that page; everything else reads as zero. Fixup (update sequence) mismatches are repaired
// instead of refused in this build (CAIRN_FUZZING), so mutations get past them.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzNTFS(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let bytes = Array(UnsafeRawBufferPointer(start: data, count: size))
    let volume = NTFSFuzzInput.volume(from: bytes)
    _ = NTFSFileSystem.probe(volume)
    guard let fs = try? NTFSFileSystem(volume: volume) else { return 0 }
    exerciseFileSystem(fs)
    return 0
}
