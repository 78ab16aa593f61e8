import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite("Disk layout")
struct DiskLayoutTests {
    /// A GPT disk (sfdisk) with a swap partition (mkswap) over stale bytes, and an empty one.
    @Test("partitions become volumes; swap is recognised and everything after its header page is free")
    func swapAndPartitions() throws {
        let dir = try TempDir("layout")
        let path = dir.file("disk.raw")
        try Tool.run("truncate", ["-s", "\(16 << 20)", path])
        try Tool.run("sfdisk", ["-q", path], stdin: Data("label: gpt\nstart=2048, size=8192, type=S\nsize=8192, type=L\n".utf8))
        let swap = dir.file("swap")
        try Tool.run("truncate", ["-s", "\(4 << 20)", swap])
        try Tool.run("mkswap", ["-q", swap])
        try Tool.run("dd", ["if=\(swap)", "of=\(path)", "bs=1M", "seek=1", "conv=notrunc", "status=none"])
        let disk = try FileBlockSource(path: path)
        let layout = DiskLayout.scan(disk, readers: [])
        #expect(layout.table.scheme == .gpt)
        #expect(layout.volumes.map(\.name) == ["p1", "p2"])
        #expect(layout.volumes.first?.content.summary == "swap")
        #expect(layout.volumes.last?.content.summary == "unrecognized")
        var warnings: [String] = []
        let free = layout.freeDiskRanges(warnings: &warnings)
        #expect(free == [(1 << 20) + 4096..<(5 << 20)], "\(free)")
        #expect(warnings.isEmpty)
    }

    @Test("a disk with no partition table and no file system is one unrecognised volume")
    func bareDisk() throws {
        let layout = DiskLayout.scan(MemoryBlockSource([UInt8](repeating: 7, count: 1 << 20), name: "m"), readers: [])
        #expect(layout.table.scheme == .none)
        #expect(layout.volumes.count == 1 && layout.volumes[0].name.isEmpty)
        var w: [String] = []
        #expect(layout.freeDiskRanges(warnings: &w).isEmpty)
    }

    @Test("a reader whose signature matches but whose open fails marks the volume damaged, with a warning")
    func damagedVolume() throws {
        let failing = FileSystemReader(typeName: "testfs", probe: { _ in true }, open: { v in
            throw CairnError(.malformedImage, "superblock says nonsense", path: v.name, offset: 1024)
        })
        let layout = DiskLayout.scan(MemoryBlockSource([UInt8](repeating: 0, count: 1 << 20), name: "m"), readers: [failing])
        guard case .damaged(let t, let reason) = layout.volumes.first?.content else {
            Issue.record("not damaged: \(String(describing: layout.volumes.first?.content.summary))")
            return
        }
        #expect(t == "testfs" && reason.contains("nonsense"))
        #expect(layout.warnings.contains { $0.contains("testfs signature found") })
    }
}
