import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite struct NTFSFileExtentTests {
    /// Every regular file of the rich image: resident and compressed data have no extents
    /// (nil), every other file's extents tile it, read back as its bytes (sparse runs as
    /// zeros) and avoid free space.
    @Test func extentsReadBackOrAreNilForResidentAndCompressed() throws {
        let img = try NTFSRichImage.get()
        let fs = try NTFSFileSystem(volume: try FileBlockSource(path: img.path))
        let free = try fs.freeRanges()
        var mapped = 0, unmapped = 0
        try fs.walk { path, entry, meta in
            guard meta.kind == .regular else { return }
            let extents = try fs.fileExtents(entry.node)
            switch try fs.node(entry.node).data {
            case nil:
                #expect(extents == [], "\(path)")
            case .resident:
                #expect(extents == nil, "\(path): resident data has no extents")
                unmapped += 1
            case .nonResident(let s):
                if s.isCompressed {
                    #expect(extents == nil, "\(path): compressed data has no extents")
                    unmapped += 1
                } else if let extents {
                    try FileExtentCheck.verify(fs, entry.node, extents, free: free, path: path)
                    mapped += 1
                } else {
                    Issue.record("\(path): plain non-resident data without extents")
                }
            }
        }
        #expect(mapped >= 5 && unmapped > 400)

        #expect(try fs.fileExtents(fs.lookup("/small.txt")) == nil)
        for path in ["/compressed/text.txt", "/compressed/random.bin", "/compressed/mixed.bin"] {
            #expect(try fs.fileExtents(fs.lookup(path)) == nil, "\(path)")
        }
        #expect(try fs.fileExtents(fs.lookup("/empty.txt")) ?? [] == [])
        let sparse = try fs.fileExtents(fs.lookup("/sparse.bin")) ?? []
        #expect(sparse.filter { $0.physicalOffset != nil }.count >= 2 && sparse.contains { $0.physicalOffset == nil && $0.length >= 1 << 20 })
        let huge = try fs.fileExtents(fs.lookup("/huge-sparse.bin")) ?? []
        #expect(huge.first?.physicalOffset == nil && huge.first?.length ?? 0 >= 4 << 30, "\(huge)")
        #expect(huge.contains { $0.physicalOffset != nil && $0.logicalOffset <= (4 << 30) + 12345 })
        // 300 written 4 KiB pieces with 4 KiB gaps (sparse runs) between them.
        let fragmented = try fs.fileExtents(fs.lookup("/fragmented.bin")) ?? []
        #expect(fragmented.filter { $0.physicalOffset != nil }.count > 10 && fragmented.contains { $0.physicalOffset == nil },
                "\(fragmented.count) extents")
        // Hard links share the mapping.
        #expect(try fs.fileExtents(fs.lookup("/big.bin")) == fs.fileExtents(fs.lookup("/docs/hardlink.bin")))

        FileExtentCheck.expectUsage("root directory") { try fs.fileExtents(fs.rootNode) }
        FileExtentCheck.expectUsage("directory") { try fs.fileExtents(fs.lookup("/docs")) }
        FileExtentCheck.expectUsage("symlink") { try fs.fileExtents(fs.lookup("/link-short")) }
    }

    /// Bytes past the initialized size read as zeros, so they are a hole even where clusters
    /// are allocated; a run that maps past the volume is an error, as for `read`.
    @Test func uninitializedTailIsAHoleAndRunsPastTheVolumeThrow() throws {
        let dir = try TempDir("ntfs-extents")
        let (image, content) = try NTFSTestSupport.plainImage(in: dir)
        let fs0 = try NTFSFileSystem(volume: try FileBlockSource(path: image))
        let node = try fs0.lookup("/content.bin")
        guard case .nonResident(var s)? = try fs0.node(node).data else {
            Issue.record("content.bin is not non-resident")
            return
        }
        let whole = try fs0.fileExtents(node) ?? []
        try FileExtentCheck.verify(fs0, node, whole, free: try fs0.freeRanges(), path: "content.bin")
        #expect(whole.allSatisfy { $0.physicalOffset != nil } && whole.reduce(0) { $0 + $1.length } == UInt64(content.count))

        // The same stream, initialized only up to 100000 bytes.
        var n = try fs0.node(node)
        s.initializedSize = 100_000
        n.data = .nonResident(s)
        fs0.cache.store(n)
        let cut = try fs0.fileExtents(node) ?? []
        #expect(cut.last == FileExtent(logicalOffset: 100_000, physicalOffset: nil, length: UInt64(content.count) - 100_000), "\(cut)")
        #expect(cut.dropLast().reduce(0) { $0 + $1.length } == 100_000)

        // A run pointing past the end of the volume.
        s.initializedSize = s.dataSize
        let k = s.runs.lastIndex { $0.lcn != nil } ?? 0
        s.runs[k].lcn = fs0.volume.size / UInt64(fs0.blockSize) + 10
        n.data = .nonResident(s)
        fs0.cache.store(n)
        #expect(throws: CairnError.self) { try fs0.fileExtents(node) }
        #expect(throws: CairnError.self) { try fs0.readAll(node) }
        withExtendedLifetime(dir) {}
    }
}
