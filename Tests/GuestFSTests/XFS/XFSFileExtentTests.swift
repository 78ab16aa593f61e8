import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite struct XFSFileExtentTests {
    /// `xfs_db -c "inode N" -c bmap` lines ("data offset O startblock S (A/B) count C flag F")
    /// as (file block, linear volume block or nil when unwritten, count).
    static func parseBmap(_ text: String, agBlocks: UInt64) -> [(UInt64, UInt64?, UInt64)] {
        var out: [(UInt64, UInt64?, UInt64)] = []
        for line in text.split(separator: "\n") where line.hasPrefix("data offset ") {
            let t = line.split(separator: " ").map(String.init)
            func after(_ key: String) -> UInt64? { t.firstIndex(of: key).flatMap { $0 + 1 < t.count ? UInt64(t[$0 + 1]) : nil } }
            guard let offset = after("offset"), let count = after("count"), let flag = after("flag"),
                  let ag = t.first(where: { $0.hasPrefix("(") && $0.hasSuffix(")") }) else { continue }
            let parts = ag.dropFirst().dropLast().split(separator: "/").compactMap { UInt64($0) }
            guard parts.count == 2 else { continue }
            out.append((offset, flag != 0 ? nil : parts[0] * agBlocks + parts[1], count))
        }
        return out
    }

    /// Every regular file of the shared fixture (extent and B+tree maps, holes, unwritten
    /// extents): the extents tile the file, read back as its bytes and avoid free space; the
    /// fragmented, sparse and preallocated ones equal `xfs_db bmap`.
    @Test func extentsReadBackAndMatchXfsDb() throws {
        let fixture = try XFSFixture.get()
        let fs = try fixture.fileSystem()
        let free = try fs.freeRanges()
        var files = 0, fragmented = 0
        try fs.walk { path, entry, meta in
            guard meta.kind == .regular else { return }
            guard let extents = try fs.fileExtents(entry.node) else {
                Issue.record("\(path): no extents")
                return
            }
            try FileExtentCheck.verify(fs, entry.node, extents, free: free, path: path)
            if let want = fixture.contents[path], extents.count == 1, let p = extents[0].physicalOffset {
                #expect(Array(fixture.image[Int(p)..<Int(p) + want.count]) == want, "\(path)")
            }
            files += 1
            if extents.filter({ $0.physicalOffset != nil }).count > 1 { fragmented += 1 }
        }
        #expect(files > 2800 && fragmented >= 3)

        let dir = try TempDir("xfs-extents")
        let image = dir.file("fs.img")
        #expect(FileManager.default.createFile(atPath: image, contents: Data(fixture.image)))
        let bs = UInt64(fs.blockSize)
        for path in ["/frag.bin", "/deep.bin", "/prealloc.bin", "/sparse.bin", "/big.bin"] {
            let node = try fs.lookup(path)
            let bmap = try Tool.run("xfs_db", ["-r", "-c", "inode \(node)", "-c", "bmap", image]).stdout
            let runs = Self.parseBmap(bmap, agBlocks: UInt64(fs.sb.agBlocks))
            #expect(!runs.isEmpty, "\(path): \(bmap)")
            let want = FileExtentCheck.expected(runs, blockSize: bs, size: try fs.metadata(of: node).size)
            #expect(try fs.fileExtents(node) == want, "\(path)")
        }
        let frag = try fs.fileExtents(fs.lookup("/frag.bin")) ?? []
        #expect(frag.filter { $0.physicalOffset != nil }.count >= 400)
        // The preallocated 1 MiB holds one written 64 KiB piece; the rest is unwritten: holes.
        let prealloc = try fs.fileExtents(fs.lookup("/prealloc.bin")) ?? []
        #expect(prealloc.filter { $0.physicalOffset != nil }.map(\.length) == [65536], "\(prealloc)")
        #expect(prealloc.first?.physicalOffset == nil && prealloc.last?.physicalOffset == nil)

        FileExtentCheck.expectUsage("root directory") { try fs.fileExtents(fs.rootNode) }
        FileExtentCheck.expectUsage("symlink") { try fs.fileExtents(fs.lookup("/link-long")) }
        FileExtentCheck.expectUsage("device") { try fs.fileExtents(fs.lookup("/chardev")) }
        withExtendedLifetime(dir) {}
    }
}
