// libFuzzer target: the VHDX reader on arbitrary bytes. It must never crash, trap, hang or
// allocate without bound: every malformed input is a thrown CairnError.
//
// Builds either way: compiled into one module together with the CairnCore and DiskFormats
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(DiskFormats)
import CairnCore
import DiskFormats
#endif

private let zeroParent = MemoryBlockSource([UInt8](repeating: 0, count: 1 << 16), name: "parent")

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzVHDX(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let bytes = Array(UnsafeRawBufferPointer(start: data, count: size))
    let file = MemoryBlockSource(bytes, name: "fuzz.vhdx")
    for parent in [nil, zeroParent] as [(any BlockSource)?] {
        guard let image = try? VHDXImage(file: file, parent: parent) else { continue }
        exercise(image)
    }
    return 0
}

/// Walks the allocation map of at most 64 MiB and reads at most 4 MiB of the image, in pieces
/// at the start of extents, plus the last 4 KiB.
private func exercise(_ image: any BlockSource) {
    guard let extents = try? image.extents(in: 0..<min(image.size, 64 << 20)) else { return }
    var budget = 4 << 20
    let piece = 64 << 10
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 16)
    defer { buffer.deallocate() }
    for e in extents.prefix(64) where budget > 0 {
        let n = Int(min(UInt64(piece), e.length))
        guard n > 0 else { continue }
        _ = try? image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: e.offset)
        budget -= n
    }
    if image.size > 0 {
        let n = Int(min(UInt64(4096), image.size))
        _ = try? image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: image.size - UInt64(n))
    }
}
