// libFuzzer target: the ext2/3/4 reader (GuestFS.ExtFileSystem) on arbitrary bytes. It must
// never crash, trap, hang or allocate without bound: every malformed input is a thrown
// CairnError.
//
// Input encoding: the input is the first bytes of a 64 MiB volume; every byte past the end of
// the input reads as zero. A small real image (its superblock at 1024, descriptors, bitmaps,
// inode tables and directory blocks all sit in its first few hundred KiB) therefore survives
// being cut short, and the file system's geometry may claim the whole 64 MiB.
// fuzz/seeds.d/ext4.sh makes seeds from mke2fs images with their trailing zeros removed.
//
// Builds either way: compiled into one module together with the CairnCore and GuestFS
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif

/// The input followed by zeros up to `volumeSize`.
struct ZeroExtendedVolume: BlockSource {
    static let volumeSize: UInt64 = 64 << 20
    let prefix: [UInt8]
    var size: UInt64 { Self.volumeSize }
    var name: String { "fuzz.ext4" }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        guard offset < UInt64(prefix.count) else { return }
        let start = Int(offset)
        let n = min(buffer.count, prefix.count - start)
        prefix.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<start + n])) }
    }

    func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        return [Extent(offset: range.lowerBound, length: end - range.lowerBound, kind: .data)]
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzExt4(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let volume = ZeroExtendedVolume(prefix: Array(UnsafeRawBufferPointer(start: data, count: size)))
    _ = ExtFileSystem.probe(volume)
    guard let fs = try? ExtFileSystem(volume: volume) else { return 0 }
    exerciseFileSystem(fs)
    return 0
}
