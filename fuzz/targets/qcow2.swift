// libFuzzer target: the qcow2 reader on arbitrary bytes. It must never crash, trap, hang or
// allocate without bound: every malformed input is a thrown CairnError.
import CairnCore
import DiskFormats

private let zeroBacking = MemoryBlockSource([UInt8](repeating: 0, count: 1 << 16), name: "backing")

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzQCOW2(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let bytes = Array(UnsafeRawBufferPointer(start: data, count: size))
    let file = MemoryBlockSource(bytes, name: "fuzz.qcow2")
    for backing in [nil, zeroBacking] as [(any BlockSource)?] {
        guard let image = try? QCOW2Image(file: file, backing: backing) else { continue }
        exercise(image)
    }
    return 0
}

/// Walks the allocation map and reads at most 4 MiB of the image, in pieces at the start of
/// data extents and across extent boundaries.
private func exercise(_ image: any BlockSource) {
    guard let extents = try? image.extents(in: 0..<image.size) else { return }
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
