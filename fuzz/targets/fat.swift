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

/// The input followed by zeros up to the size the boot sector claims (at most 64 MiB).
private struct ZeroExtendedVolume: BlockSource {
    let bytes: [UInt8]
    let size: UInt64
    var name: String { "fuzz.fat" }

    init(_ input: [UInt8]) {
        bytes = input
        let b = CheckedBytes(input)
        let bps = UInt64(b.u16(at: 11) ?? 0)
        let sectors = UInt64(b.u16(at: 19).flatMap { $0 == 0 ? nil : UInt32($0) } ?? b.u32(at: 32) ?? 0)
        size = max(UInt64(input.count), min(64 << 20, bps * sectors))
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        guard offset < UInt64(bytes.count) else { return }
        let start = Int(offset)
        let n = min(buffer.count, bytes.count - start)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<start + n])) }
    }

    func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        return [Extent(offset: range.lowerBound, length: end - range.lowerBound, kind: .data)]
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFAT(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let volume = ZeroExtendedVolume(Array(UnsafeRawBufferPointer(start: data, count: size)))
    _ = FATFileSystem.probe(volume)
    guard let fs = try? FATFileSystem(volume: volume) else { return 0 }
    exerciseFileSystem(fs)
    return 0
}
