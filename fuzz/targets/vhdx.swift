// libFuzzer target: the VHDX reader on arbitrary bytes. It must never crash, trap, hang or
// allocate without bound: every malformed input is a thrown CairnError.
//
// A VHDX places its structures at 64 KiB and 1 MiB alignments, so a real image is at least
// 4 MiB, and libFuzzer slows to a few hundred executions a second on inputs that large. The
// input is therefore a list of 4 KiB pages laid out at the places a VHDX keeps its
// structures (`pageOffsets`; later pages go to the data area), and the file between them reads
// as zeros. fuzz/seeds.sh cuts real qemu-img images into this form.
//
// Builds either way: compiled into one module together with the CairnCore and DiskFormats
// sources (nothing to import), or linked against those modules as fuzz/build.sh does.
#if canImport(DiskFormats)
import CairnCore
import DiskFormats
#endif

private let zeroParent = MemoryBlockSource([UInt8](repeating: 0, count: 1 << 16), name: "parent")

/// File offsets of the input's pages: file identifier, header 1, header 2, region table 1,
/// region table 2, log, BAT (2 MiB), metadata table and metadata items (3 MiB, +64 KiB).
let pageOffsets: [UInt64] = [0, 64 << 10, 128 << 10, 192 << 10, 256 << 10, 1 << 20, 2 << 20, 3 << 20, (3 << 20) + (64 << 10)]
let pageSize = 4096
/// Pages past `pageOffsets` land every 64 KiB from 4 MiB on; the file is 8 MiB.
let dataStart: UInt64 = 4 << 20
let pagedFileSize: UInt64 = 8 << 20

/// A sparse file made of 4 KiB pages at fixed offsets; zeros elsewhere.
struct PagedFile: BlockSource {
    let pages: [(offset: UInt64, bytes: [UInt8])]
    var size: UInt64 { pagedFileSize }
    var name: String { "fuzz.vhdx" }

    init(_ input: UnsafeRawBufferPointer) {
        var pages: [(UInt64, [UInt8])] = []
        var k = 0
        while k * pageSize < input.count {
            let offset = k < pageOffsets.count ? pageOffsets[k] : dataStart + UInt64(k - pageOffsets.count) * (64 << 10)
            if offset + UInt64(pageSize) > pagedFileSize { break }
            var page = [UInt8](repeating: 0, count: pageSize)
            let n = min(pageSize, input.count - k * pageSize)
            page.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[(k * pageSize)..<(k * pageSize + n)])) }
            pages.append((offset, page))
            k += 1
        }
        self.pages = pages
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let end = offset + UInt64(buffer.count)
        for (start, bytes) in pages where start < end && start + UInt64(pageSize) > offset {
            let from = max(start, offset), to = min(start + UInt64(pageSize), end)
            bytes.withUnsafeBytes { src in
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
public func fuzzVHDX(_ data: UnsafeRawPointer, _ size: Int) -> CInt {
    let file = PagedFile(UnsafeRawBufferPointer(start: data, count: size))
    for parent in [nil, zeroParent] as [(any BlockSource)?] {
        guard let image = try? VHDXImage(file: file, parent: parent) else { continue }
        exercise(image)
    }
    return 0
}
