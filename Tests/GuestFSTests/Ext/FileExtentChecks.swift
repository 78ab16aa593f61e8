import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// Checks of `FileSystem.fileExtents` shared by the ext, XFS, NTFS and FAT tests.
enum FileExtentCheck {
    /// Holes larger than this are read back only at their first and last MiB.
    static let sampledHole: UInt64 = 64 << 20

    /// What one file's extents add up to.
    struct Summary {
        var mapped = 0
        var holes = 0
    }

    /// Checks the extents of regular file `node`: they tile [0, size) in order with positive
    /// lengths; no two neighbours could have been merged; every mapped extent lies in the
    /// volume, outside `free` (ascending), and its volume bytes equal what `read` returns at
    /// that logical offset; holes read as zeros.
    @discardableResult
    static func verify(_ fs: some FileSystem, _ node: UInt64, _ extents: [FileExtent], free: [Range<UInt64>],
                       path: String) throws -> Summary {
        let size = try fs.metadata(of: node).size
        var summary = Summary()
        var pos: UInt64 = 0
        for (k, e) in extents.enumerated() {
            #expect(e.logicalOffset == pos && e.length > 0, "\(path): extent \(k) \(e) does not follow byte \(pos)")
            if k > 0 {
                let prev = extents[k - 1]
                let mergeable = switch (prev.physicalOffset, e.physicalOffset) {
                case (nil, nil): true
                case let (a?, b?): a + prev.length == b
                default: false
                }
                #expect(!mergeable, "\(path): extents \(k - 1) and \(k) should have been merged")
            }
            pos = e.logicalOffset + e.length
            if let p = e.physicalOffset {
                summary.mapped += 1
                #expect(p + e.length <= fs.volume.size, "\(path): extent \(k) ends past the volume")
                let r = p..<p + e.length
                #expect(!free.contains { $0.overlaps(r) }, "\(path): extent \(k) (\(r)) overlaps free space")
            } else {
                summary.holes += 1
            }
            var pieces: [(UInt64, UInt64)] = [(0, e.length)]
            if e.physicalOffset == nil, e.length > sampledHole {
                pieces = [(0, 1 << 20), (e.length - (1 << 20), 1 << 20)]
            }
            for (from, count) in pieces {
                var done: UInt64 = 0
                while done < count {
                    let n = Int(min(count - done, 1 << 20))
                    let at = from + done
                    var viaFile = [UInt8](repeating: 0xA5, count: n)
                    let got = try viaFile.withUnsafeMutableBytes { try fs.read(node, into: $0, at: e.logicalOffset + at) }
                    #expect(got == n, "\(path): short read at \(e.logicalOffset + at)")
                    if let p = e.physicalOffset {
                        var viaVolume = [UInt8](repeating: 0x5A, count: n)
                        try viaVolume.withUnsafeMutableBytes { try fs.volume.read(into: $0, at: p + at) }
                        #expect(viaVolume == viaFile, "\(path): extent \(k) bytes at +\(at) differ from the file's")
                    } else {
                        #expect(viaFile.allSatisfy { $0 == 0 }, "\(path): hole \(k) at +\(at) does not read as zeros")
                    }
                    done += UInt64(n)
                }
            }
        }
        #expect(pos == size, "\(path): extents cover \(pos) of \(size) bytes")
        return summary
    }

    /// The extents a referee's block list gives: `(logical block, physical block or nil,
    /// block count)` in logical order, clipped to `size`, gaps as holes, merged.
    static func expected(_ runs: [(UInt64, UInt64?, UInt64)], blockSize: UInt64, size: UInt64) -> [FileExtent] {
        var out: [FileExtent] = []
        var pos: UInt64 = 0
        for (logical, physical, count) in runs.sorted(by: { $0.0 < $1.0 }) {
            let start = logical * blockSize
            guard start < size else { break }
            out.append(logicalOffset: pos, physicalOffset: nil, length: start - pos)
            let length = min(count * blockSize, size - start)
            out.append(logicalOffset: start, physicalOffset: physical.map { $0 * blockSize }, length: length)
            pos = start + length
        }
        out.append(logicalOffset: pos, physicalOffset: nil, length: size - pos)
        return out
    }

    /// Asserts that `body` throws a `.usage` CairnError (a node that is not a regular file).
    static func expectUsage(_ what: String, _ body: () throws -> [FileExtent]?) {
        do {
            _ = try body()
            Issue.record("\(what): fileExtents did not throw")
        } catch let e as CairnError {
            #expect(e.code == .usage, "\(what): \(e)")
        } catch {
            Issue.record("\(what): \(error)")
        }
    }
}
