import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite struct ExtFileExtentTests {
    /// The mapping of `debugfs stat`'s EXTENTS or BLOCKS list as (logical block, physical
    /// block or nil for an unwritten extent, count); extent-tree and indirect blocks ("(ETB0)",
    /// "(IND)", ...) are left out.
    static func parseBlocks(_ stat: String) -> [(UInt64, UInt64?, UInt64)] {
        guard let r = stat.range(of: "EXTENTS:") ?? stat.range(of: "BLOCKS:") else { return [] }
        var out: [(UInt64, UInt64?, UInt64)] = []
        for token in stat[r.upperBound...].split(whereSeparator: { $0 == "," || $0 == "\n" || $0 == " " }) {
            guard token.hasPrefix("("), let close = token.firstIndex(of: ")") else { continue }
            var inside = String(token[token.index(after: token.startIndex)..<close])
            let unwritten = inside.contains("[u]")
            inside = inside.replacingOccurrences(of: "[u]", with: "")
            guard inside.first?.isNumber == true else { continue }
            let logical = inside.split(separator: "-").compactMap { UInt64($0) }
            let physical = token[token.index(after: close)...].dropFirst().split(separator: "-").compactMap { UInt64($0) }
            guard let l0 = logical.first, let l1 = logical.last, let p0 = physical.first else { continue }
            out.append((l0, unwritten ? nil : p0, l1 - l0 + 1))
        }
        return out
    }

    /// Every regular file of every configuration (extent trees, block pointers up to the
    /// triple indirect block, inline data, bigalloc, 64 KiB blocks): the extents tile the file,
    /// read back as the file's bytes, avoid free space and equal `debugfs stat`'s mapping.
    @Test(arguments: ExtFileSystemTests.configs) func extentsMatchDebugfsAndReadBack(_ c: ExtConfig) throws {
        let dir = try TempDir("ext-extents")
        let source = try ExtFixture.makeSource(in: dir)
        // Sparse past the triple indirect block on 1 KiB blocks.
        let far = source.root + "/far.bin"
        #expect(FileManager.default.createFile(atPath: far, contents: nil))
        try writeBytes(Array("start".utf8), to: far, at: 0)
        try writeBytes(Array("the end of a very sparse file".utf8), to: far, at: 80 << 20)
        let image = try ExtFixture.make(c.options, source: source, in: dir, name: "\(c.name).img", size: c.size, optimize: c.optimize)
        let prealloc = ["ext4-4k", "ext4-1k-64bit-htree"].contains(c.name)
        if prealloc {
            _ = try ExtFixture.debugfs(image, ["write /dev/null prealloc", "fallocate /prealloc 0 99", "sif /prealloc size \(100 << 10)"],
                                       writable: true)
        }
        let fs = try ExtFileSystem(volume: try FileBlockSource(path: image))
        let bs = UInt64(fs.blockSize)
        let free = try fs.freeRanges()
        var paths: [UInt64: String] = [:]
        for (path, entry, meta) in try ExtFixture.walk(fs) where meta.kind == .regular && paths[entry.node] == nil {
            paths[entry.node] = path
        }
        let nodes = paths.keys.sorted()
        let stats = try ExtFixture.debugfs(image, nodes.map { "stat <\($0)>" })
        #expect(stats.count == nodes.count)
        var fragmented = 0, inline = 0
        for (node, text) in zip(nodes, stats) {
            let path = paths[node] ?? "?"
            let i = try fs.inode(node)
            guard let extents = try fs.fileExtents(node) else {
                #expect(i.hasInlineData, "\(path): no extents but no inline data either")
                inline += 1
                continue
            }
            try FileExtentCheck.verify(fs, node, extents, free: free, path: path)
            let want = FileExtentCheck.expected(Self.parseBlocks(text), blockSize: bs, size: i.size)
            #expect(extents == want, "\(path): ours \(extents), debugfs \(want)")
            if extents.filter({ $0.physicalOffset != nil }).count > 1 { fragmented += 1 }
        }
        #expect(fragmented >= 3, "sparse.bin, islands.bin and far.bin map several pieces")
        #expect((inline > 0) == c.options.contains { $0.contains("inline_data") })

        let farExtents = try fs.fileExtents(fs.lookup("/far.bin")) ?? []
        #expect(farExtents.count == 3 && farExtents[1].physicalOffset == nil && farExtents[1].length > 79 << 20, "\(farExtents)")
        let sparse = try fs.fileExtents(fs.lookup("/sparse.bin")) ?? []
        #expect(sparse.filter { $0.physicalOffset == nil }.reduce(0) { $0 + $1.length } >= 3 << 20)
        #expect(try fs.fileExtents(fs.lookup("/empty")) ?? [] == [])
        if prealloc {
            // An unwritten extent is a hole, whatever its blocks hold.
            let node = try fs.lookup("/prealloc")
            #expect(try fs.extentRuns(fs.inode(node)).contains { $0.unwritten })
            #expect(try fs.fileExtents(node) == [FileExtent(logicalOffset: 0, physicalOffset: nil, length: 100 << 10)])
        }
        FileExtentCheck.expectUsage("root directory") { try fs.fileExtents(fs.rootNode) }
        FileExtentCheck.expectUsage("symlink") { try fs.fileExtents(fs.lookup("/link-short")) }
        FileExtentCheck.expectUsage("fifo") { try fs.fileExtents(fs.lookup("/fifo")) }
        withExtendedLifetime(dir) {}
    }

    /// Block pointers that reach the same indirect block twice are refused, not walked again.
    @Test func crossLinkedIndirectBlockIsRefused() throws {
        let dir = try TempDir("ext-extents-xlink")
        let source = try ExtFixture.makeSource(in: dir)
        let image = try ExtFixture.make(["-t", "ext2", "-b", "1024"], source: source, in: dir, name: "x.img")
        let fs0 = try ExtFileSystem(volume: try FileBlockSource(path: image))
        let i = try fs0.inode(fs0.lookup("/big.bin"))
        // Double indirect block: point its second entry at the block its first names.
        let dind = UInt64(i.blockWord(13))
        #expect(dind != 0)
        var bytes = try readFile(image)
        let at = Int(dind * 1024)
        for k in 0..<4 { bytes[at + 4 + k] = bytes[at + k] }
        let fs = try ExtFileSystem(volume: MemoryBlockSource(bytes, name: "xlink.img"))
        #expect(throws: CairnError.self) { try fs.fileExtents(fs.lookup("/big.bin")) }
        withExtendedLifetime(dir) {}
    }
}
