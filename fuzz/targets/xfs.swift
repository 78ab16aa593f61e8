// libFuzzer target: the XFS reader (GuestFS) on arbitrary volumes. It must never crash, trap,
// hang or allocate without bound: every malformed input is a thrown CairnError.
//
// Input encoding: XFS keeps its structures all over the volume (superblock and AG headers at
// the start of every AG, inode chunks and directory blocks after the log), so a real image is
// megabytes long but mostly zeros. The input is therefore a list of records, each a 4-byte
// big-endian sector number (modulo 131072) followed by 512 bytes of that sector's content; the
// volume is 64 MiB and every sector no record names reads as zeros. A later record for the
// same sector wins; a short last record is padded with zeros. fuzz/seeds.d/xfs.sh cuts real
// mkfs.xfs images into this form (every non-zero sector outside the log).
// Tests/GuestFSTests/XFS/XFSHostileTests.swift decodes the same encoding (XFSFuzzVolume).
//
// Builds either way: compiled into one module together with the CairnCore and GuestFS
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(GuestFS)
import CairnCore
import GuestFS
#endif

/// A 64 MiB volume made of 512-byte sectors given by the input; zeros elsewhere.
struct SectorListVolume: BlockSource {
    static let sectors = 131_072
    let pages: [Int: [UInt8]]
    var size: UInt64 { UInt64(Self.sectors) * 512 }
    var name: String { "fuzz.xfs" }

    init(_ input: UnsafeRawBufferPointer) {
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

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
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

    func extents(in range: Range<UInt64>) throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: min(range.upperBound, size) - range.lowerBound, kind: .data)]
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzXFS(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let volume = SectorListVolume(UnsafeRawBufferPointer(start: data, count: size))
    _ = XFSFileSystem.probe(volume)
    guard let fs = try? XFSFileSystem(volume: volume) else { return 0 }
    exerciseFileSystem(fs)
    return 0
}
