// Shared by every fuzz target: drives a GuestFS reader over everything it exposes.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif

/// Walks at most 2,000 entries of `fs`, reads at most 64 KiB of each regular file (4 MiB in
/// all), every symlink target, and the free-space map, whose ranges must be ascending,
/// non-overlapping and inside the volume (a broken invariant traps: it is a finding).
/// Errors are the expected outcome for most inputs and are ignored.
func exerciseFileSystem(_ fs: any FileSystem) {
    let piece = 64 << 10
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 16)
    defer { buffer.deallocate() }
    var budget = 4 << 20
    _ = try? fs.walk(maxEntries: 2_000) { _, entry, meta in
        switch meta.kind {
        case .regular where budget > 0:
            if let n = try? fs.read(entry.node, into: buffer, at: 0) {
                precondition(n >= 0 && n <= piece, "read returned \(n) for a \(piece)-byte buffer")
            }
            budget -= piece
        case .symlink:
            _ = try? fs.readLink(entry.node)
        default:
            break
        }
    }
    if let free = try? fs.freeRanges() {
        var last: UInt64 = 0
        for r in free {
            precondition(r.lowerBound >= last, "free ranges out of order or overlapping")
            precondition(r.upperBound <= fs.volume.size, "free range \(r) past the volume end \(fs.volume.size)")
            last = r.upperBound
        }
    }
}
