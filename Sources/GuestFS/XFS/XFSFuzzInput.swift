import CairnCore

/// The fuzz input encoding of fuzz/targets/xfs.swift (shared with the tests that replay it): a list of records, each a
/// 4-byte big-endian sector number (taken modulo the volume's 131072 sectors) and 512 bytes
/// of content; the volume is 64 MiB and every sector no record names reads as zeros. A later
/// record for the same sector wins; a short last record is padded with zeros.
package struct XFSFuzzVolume: BlockSource {
    package static let sectors = 131_072
    let pages: [Int: [UInt8]]
    package var size: UInt64 { UInt64(Self.sectors) * 512 }
    package var name: String { "fuzz.xfs" }

    package init(_ input: [UInt8]) {
        var pages: [Int: [UInt8]] = [:]
        var k = 0
        while k + 4 < input.count {
            let sector = (Int(input[k]) << 24 | Int(input[k + 1]) << 16 | Int(input[k + 2]) << 8 | Int(input[k + 3])) % Self.sectors
            var page = Array(input[(k + 4)..<min(k + 516, input.count)])
            page += [UInt8](repeating: 0, count: 512 - page.count)
            pages[sector] = page
            k += 516
        }
        self.pages = pages
    }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        guard buffer.count > 0 else { return }
        let first = Int(offset / 512), last = Int((offset + UInt64(buffer.count) - 1) / 512)
        for sector in first...last {
            guard let page = pages[sector] else { continue }
            let start = UInt64(sector) * 512
            let from = max(start, offset), to = min(start + 512, offset + UInt64(buffer.count))
            page.withUnsafeBytes { src in
                UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - offset)..<Int(to - offset)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(from - start)..<Int(to - start)]))
            }
        }
    }

    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: min(range.upperBound, size) - range.lowerBound, kind: .data)]
    }
}
