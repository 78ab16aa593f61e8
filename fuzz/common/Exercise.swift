// Shared by every fuzz target (fuzz/build.sh compiles it into each).
#if canImport(DiskFormats)
import CairnCore
#endif
import Glibc

private let zeroPage = [UInt8](repeating: 0, count: 64 << 10)

/// Whether `buffer` holds only zeros. memcmp, not a Swift loop: every byte comparison in an
/// instrumented loop is a coverage callback, and that loop was most of a run's time.
func readsAsZeros(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
    zeroPage.withUnsafeBytes { zeros in
        var at = 0
        while at < buffer.count {
            let n = min(zeros.count, buffer.count - at)
            if memcmp(buffer.baseAddress! + at, zeros.baseAddress!, n) != 0 { return false }
            at += n
        }
        return true
    }
}

/// Walks the allocation map of at most the first 64 MiB of `image` and reads at most 4 MiB of
/// it, 64 KiB at the start of each extent, plus its last 4 KiB: enough to reach every table
/// lookup and decompression path without letting one input cost unbounded time. The map must
/// tile the range in order, and a range it calls zero or unallocated must read as zeros
/// (a broken invariant is a finding: it traps).
func exercise(_ image: any BlockSource) {
    let range = 0..<min(image.size, 64 << 20)
    guard let extents = try? image.extents(in: range) else { return }
    var pos = range.lowerBound
    for e in extents {
        precondition(e.offset == pos && e.length > 0, "extents do not tile the range in order")
        pos = e.end
    }
    precondition(pos == range.upperBound, "extents end at \(pos), not \(range.upperBound)")
    var budget = 4 << 20
    let piece = 64 << 10
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 16)
    defer { buffer.deallocate() }
    for e in extents.prefix(64) where budget > 0 {
        let n = Int(min(UInt64(piece), e.length))
        guard n > 0 else { continue }
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
        if (try? image.read(into: target, at: e.offset)) != nil, e.kind != .data {
            precondition(readsAsZeros(target), "a \(e.kind) extent read non-zero bytes")
        }
        budget -= n
    }
    if image.size > 0 {
        let n = Int(min(UInt64(4096), image.size))
        _ = try? image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: image.size - UInt64(n))
    }
}
