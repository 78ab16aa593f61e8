import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite(.enabled(if: FATFixture.available && Tool.exists("mshowfat") && Tool.exists("mdel"), "needs mtools, dosfstools and blkid"))
struct FATFileExtentTests {
    /// The cluster chain `mshowfat` prints ("::/name <2-11> <22-60>") as (first, last) pairs.
    static func parseShowfat(_ text: String) -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        var rest = Substring(text)
        while let open = rest.firstIndex(of: "<"), let close = rest[open...].firstIndex(of: ">") {
            let ends = rest[rest.index(after: open)..<close].split(separator: "-").compactMap { UInt64($0) }
            if let a = ends.first, let b = ends.last { out.append((a, b)) }
            rest = rest[rest.index(after: close)...]
        }
        return out
    }

    /// Every regular file of each fixture, plus a file that mtools fragments (it fills the
    /// hole a deleted file left, then continues past the file that kept its place): the
    /// extents tile the file, read back as its bytes, avoid free clusters and equal the
    /// cluster chain `mshowfat` prints.
    @Test(arguments: FATFixture.specs)
    func extentsMatchTheClusterChain(_ spec: FATFixture.Spec) throws {
        let dir = try TempDir("fat-extents")
        let (image, tree) = try FATFixture.make(spec, in: dir)
        var rng = SeededRandom(seed: 0xF4A6)
        let cs = spec.sectorSize * spec.sectorsPerCluster
        let pieces = [("fraga.bin", rng.bytes(5 * cs)), ("fragb.bin", rng.bytes(10 * cs + 7)), ("fragc.bin", rng.bytes(25 * cs + 99))]
        for (name, bytes) in pieces {
            #expect(FileManager.default.createFile(atPath: dir.file(name), contents: Data(bytes)))
        }
        try Tool.run("mcopy", ["-i", image, dir.file("fraga.bin"), dir.file("fragb.bin"), "::/"], environment: FATFixture.env)
        try Tool.run("mdel", ["-i", image, "::/fraga.bin"], environment: FATFixture.env)
        try Tool.run("mcopy", ["-i", image, dir.file("fragc.bin"), "::/"], environment: FATFixture.env)
        try Tool.run("fsck.fat", ["-n", image])

        let fs = try FATFileSystem(volume: try FileBlockSource(path: image))
        let free = try fs.freeRanges()
        var files = 0
        for (path, (entry, meta)) in try FATFixture.walk(fs) where meta.kind == .regular {
            guard let extents = try fs.fileExtents(entry.node) else {
                Issue.record("\(path): no extents")
                continue
            }
            try FileExtentCheck.verify(fs, entry.node, extents, free: free, path: path)
            if let want = tree.files[path] { #expect(try fs.readAll(entry.node) == want, "\(path)") }
            files += 1
        }
        #expect(files == tree.files.count + 2)

        for path in ["fragc.bin", "fragb.bin", "big.bin", "hello.txt", "sub/small.bin", "holes.bin"] {
            let node = try fs.lookup("/" + path)
            let size = try fs.metadata(of: node).size
            let chain = Self.parseShowfat(try Tool.run("mshowfat", ["-i", image, "::/" + path], environment: FATFixture.env).stdout)
            var want: [FileExtent] = []
            var logical: UInt64 = 0
            for (first, last) in chain where logical < size {
                let length = min((last - first + 1) * UInt64(cs), size - logical)
                want.append(logicalOffset: logical, physicalOffset: fs.boot.clusterOffset(UInt32(first)), length: length)
                logical += length
            }
            #expect(!chain.isEmpty && logical == size, "\(path)")
            #expect(try fs.fileExtents(node) == want, "\(path)")
        }
        let frag = try fs.fileExtents(fs.lookup("/fragc.bin")) ?? []
        if spec.fat != 32 {
            // FAT12/16: mtools allocates from the first free cluster, so the deleted file's hole.
            #expect(frag.count >= 2, "\(frag)")
        }
        #expect(try fs.fileExtents(fs.lookup("/empty")) == [])
        FileExtentCheck.expectUsage("root directory") { try fs.fileExtents(fs.rootNode) }
        FileExtentCheck.expectUsage("directory") { try fs.fileExtents(fs.lookup("/sub")) }
        withExtendedLifetime(dir) {}
    }
}
