import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// Fixtures are made by the real `sfdisk`, which is also the referee (`sfdisk --json`).
enum PartitionFixture {
    static let diskSize = 16 << 20

    static let gptScript = """
        label: gpt
        start=2048, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC3B8, name="EFI System"
        size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root fs"
        size=2048, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name="swap"
        size=6000, type=E6D6D379-F507-44C2-A23C-238F2A3DF928, name="lvm pv ü", attrs="LegacyBIOSBootable"

        """

    static let mbrScript = """
        label: dos
        start=2048, size=4096, type=83, bootable
        size=4096, type=82
        size=4096, type=8e
        type=5
        size=2048, type=83
        size=2048, type=7
        size=2048, type=c

        """

    /// A 16 MiB sparse image partitioned by `sfdisk` from `script`.
    static func make(_ script: String, in dir: TempDir, name: String) throws -> String {
        let path = dir.file(name)
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        try Tool.run("truncate", ["-s", "\(diskSize)", path])
        try Tool.run("sfdisk", ["-q", path], stdin: Data(script.utf8))
        // Write a pattern into each partition's first 64 KiB so window reads are checkable.
        var rng = SeededRandom(seed: UInt64(name.utf8.count))
        for p in try sfdiskJSON(path) {
            try writeBytes(rng.bytes(65536), to: path, at: UInt64((p["start"] as? Int ?? 0) * 512) + 1024)
        }
        return path
    }

    /// The partitions of `sfdisk --json path`.
    static func sfdiskJSON(_ path: String) throws -> [[String: Any]] {
        let out = try Tool.run("sfdisk", ["--json", path])
        let obj = try JSONSerialization.jsonObject(with: out.stdoutData) as? [String: Any]
        let table = obj?["partitiontable"] as? [String: Any]
        return table?["partitions"] as? [[String: Any]] ?? []
    }

    static func index(ofNode node: String) -> Int {
        Int(String(node.reversed().prefix { $0.isNumber }.reversed())) ?? -1
    }

    static func get32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
    static func put32(_ v: UInt32, _ o: Int, _ b: inout [UInt8]) {
        for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
}

@Suite struct PartitionTableTests {
    @Test func gptMatchesSfdisk() throws {
        let dir = try TempDir("gpt")
        let path = try PartitionFixture.make(PartitionFixture.gptScript, in: dir, name: "gpt.img")
        let disk = try FileBlockSource(path: path)
        let table = try PartitionTable.read(disk)
        #expect(table.scheme == .gpt)
        #expect(table.warnings.isEmpty, "\(table.warnings)")
        let ref = try PartitionFixture.sfdiskJSON(path)
        #expect(ref.count == 4)
        #expect(table.partitions.count == ref.count)
        for (p, r) in zip(table.partitions, ref) {
            #expect(p.index == PartitionFixture.index(ofNode: r["node"] as? String ?? ""))
            #expect(p.start == UInt64((r["start"] as? Int ?? -1) * 512))
            #expect(p.length == UInt64((r["size"] as? Int ?? -1) * 512))
            #expect(p.type == .gpt((r["type"] as? String ?? "").lowercased()))
            #expect(p.uuid == (r["uuid"] as? String)?.lowercased())
            #expect(p.name == r["name"] as? String)
            #expect(p.bootable == ((r["attrs"] as? String)?.contains("LegacyBIOSBootable") ?? false))
            #expect(!p.isExtendedContainer)
        }
        #expect(table.partitions.map(\.name) == ["EFI System", "root fs", "swap", "lvm pv ü"])
        #expect(table.partitions[0].type == .gpt("c12a7328-f81f-11d2-ba4b-00a0c93ec3b8"))
        let json = try Tool.run("sfdisk", ["--json", path]).stdoutData
        let id = ((try JSONSerialization.jsonObject(with: json) as? [String: Any])?["partitiontable"] as? [String: Any])?["id"] as? String
        #expect(table.diskGUID == id?.lowercased())
    }

    @Test func mbrWithLogicalPartitionsMatchesSfdisk() throws {
        let dir = try TempDir("mbr")
        let path = try PartitionFixture.make(PartitionFixture.mbrScript, in: dir, name: "mbr.img")
        let table = try PartitionTable.read(try FileBlockSource(path: path))
        #expect(table.scheme == .mbr)
        let ref = try PartitionFixture.sfdiskJSON(path)
        #expect(ref.count == 7)
        #expect(table.partitions.map(\.index) == [1, 2, 3, 4, 5, 6, 7])
        #expect(table.partitions.count == ref.count)
        for (p, r) in zip(table.partitions, ref) {
            #expect(p.index == PartitionFixture.index(ofNode: r["node"] as? String ?? ""))
            #expect(p.start == UInt64((r["start"] as? Int ?? -1) * 512))
            #expect(p.length == UInt64((r["size"] as? Int ?? -1) * 512))
            guard case .mbr(let t) = p.type else { Issue.record("not an MBR type"); continue }
            #expect(String(t, radix: 16) == r["type"] as? String)
            #expect(p.bootable == (r["bootable"] as? Bool ?? false))
            #expect(p.isExtendedContainer == (t == 5))
            #expect(p.uuid == nil && p.name.isEmpty)
        }
    }

    @Test func corruptPrimaryGPTUsesBackup() throws {
        let dir = try TempDir("gpt-bad")
        let path = try PartitionFixture.make(PartitionFixture.gptScript, in: dir, name: "gpt.img")
        let good = try PartitionTable.read(try FileBlockSource(path: path))
        var bytes = try readFile(path)
        bytes[512 + 40] ^= 0x01  // first usable LBA: header CRC now fails
        let table = try PartitionTable.read(MemoryBlockSource(bytes, name: "gpt.img"))
        #expect(table.scheme == .gpt)
        #expect(table.partitions == good.partitions)
        #expect(table.warnings.contains { $0.contains("primary GPT unusable") && $0.contains("backup") }, "\(table.warnings)")

        // A damaged entry array of the primary is also caught by its CRC.
        var bytes2 = try readFile(path)
        bytes2[1024 + 56] ^= 0x20  // first entry's name
        let t2 = try PartitionTable.read(MemoryBlockSource(bytes2))
        #expect(t2.partitions == good.partitions)
        #expect(t2.warnings.contains { $0.contains("entry array CRC32") }, "\(t2.warnings)")

        // A damaged backup is reported while the primary is used.
        var bytes3 = try readFile(path)
        bytes3[bytes3.count - 512 + 30] ^= 0xFF
        let t3 = try PartitionTable.read(MemoryBlockSource(bytes3))
        #expect(t3.partitions == good.partitions)
        #expect(t3.warnings.contains { $0.contains("backup GPT unusable") }, "\(t3.warnings)")

        // Both damaged: a clear error naming both.
        bytes[bytes.count - 512 + 30] ^= 0xFF
        #expect {
            try PartitionTable.read(MemoryBlockSource(bytes, name: "gpt.img"))
        } throws: { error in
            guard let e = error as? CairnError else { return false }
            return e.code == .malformedImage && e.message.contains("both GPT headers") && e.message.contains("primary")
                && e.message.contains("backup")
        }
    }

    /// Offsets (bytes) of the EBRs of the first extended partition, walked by hand.
    static func ebrOffsets(_ b: [UInt8]) -> [Int] {
        var ext = 0
        for slot in 0..<4 where [0x05, 0x0F, 0x85].contains(b[446 + 16 * slot + 4]) {
            ext = Int(PartitionFixture.get32(b, 446 + 16 * slot + 8))
        }
        var out: [Int] = []
        var lba = ext
        while out.count < 10 {
            out.append(lba * 512)
            let link = lba * 512 + 446 + 16
            guard b[link + 4] != 0 else { break }
            lba = ext + Int(PartitionFixture.get32(b, link + 8))
        }
        return out
    }

    @Test func ebrLoopThrows() throws {
        let dir = try TempDir("mbr-loop")
        let path = try PartitionFixture.make(PartitionFixture.mbrScript, in: dir, name: "mbr.img")
        let bytes = try readFile(path)
        let ebrs = Self.ebrOffsets(bytes)
        #expect(ebrs.count == 3)
        // Last EBR links back to the first (relative LBA 0 = the extended partition's start).
        var loop = bytes
        let link = ebrs[2] + 446 + 16
        loop[link + 4] = 0x05
        PartitionFixture.put32(0, link + 8, &loop)
        PartitionFixture.put32(2048, link + 12, &loop)
        #expect {
            try PartitionTable.read(MemoryBlockSource(loop))
        } throws: { error in
            (error as? CairnError).map { $0.code == .malformedImage && $0.message.contains("loops") } ?? false
        }
        // An EBR that links to itself.
        var selfLoop = bytes
        let link2 = ebrs[1] + 446 + 16
        PartitionFixture.put32(UInt32((ebrs[1] - ebrs[0]) / 512), link2 + 8, &selfLoop)
        #expect(throws: CairnError.self) { try PartitionTable.read(MemoryBlockSource(selfLoop)) }
    }

    @Test func longEBRChainThrows() throws {
        // 200 EBRs, one per sector, each linking to the next.
        let sectors = 256
        var b = [UInt8](repeating: 0, count: sectors * 512)
        b[510] = 0x55; b[511] = 0xAA
        b[446 + 4] = 0x0F
        PartitionFixture.put32(1, 446 + 8, &b)
        PartitionFixture.put32(UInt32(sectors - 1), 446 + 12, &b)
        for k in 0..<200 {
            let o = (1 + k) * 512
            b[o + 510] = 0x55; b[o + 511] = 0xAA
            b[o + 446 + 16 + 4] = 0x05
            PartitionFixture.put32(UInt32(k + 1), o + 446 + 16 + 8, &b)
            PartitionFixture.put32(1, o + 446 + 16 + 12, &b)
        }
        #expect {
            try PartitionTable.read(MemoryBlockSource(b))
        } throws: { error in
            (error as? CairnError).map { $0.message.contains("more than 128") } ?? false
        }
    }

    @Test func partitionPastDiskEndThrowsNamingIt() throws {
        var b = [UInt8](repeating: 0, count: 64 * 512)
        b[510] = 0x55; b[511] = 0xAA
        b[446 + 16 + 4] = 0x83
        PartitionFixture.put32(8, 446 + 16 + 8, &b)
        PartitionFixture.put32(100, 446 + 16 + 12, &b)
        #expect {
            try PartitionTable.read(MemoryBlockSource(b))
        } throws: { error in
            (error as? CairnError).map { $0.code == .malformedImage && $0.message.contains("MBR partition 2") } ?? false
        }
    }

    @Test func noTable() throws {
        #expect(try PartitionTable.read(MemoryBlockSource([UInt8](repeating: 0, count: 4096))).scheme == .none)
        #expect(try PartitionTable.read(MemoryBlockSource([1, 2, 3])).scheme == .none)
        #expect(try PartitionTable.read(MemoryBlockSource([])).scheme == .none)
    }

    @Test func crc32KnownAnswer() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
        #expect(CRC32.checksum([UInt8]()) == 0)
    }

    @Test func partitionSourceReadsLikeDd() throws {
        let dir = try TempDir("psrc")
        for (script, name) in [(PartitionFixture.gptScript, "gpt.img"), (PartitionFixture.mbrScript, "mbr.img")] {
            let path = try PartitionFixture.make(script, in: dir, name: name)
            let disk = try FileBlockSource(path: path)
            let file = try readFile(path)
            for p in try PartitionTable.read(disk).partitions where !p.isExtendedContainer {
                let src = try PartitionSource(disk: disk, partition: p)
                #expect(src.size == p.length)
                // The same bytes `dd if=disk skip=start count=length iflag=skip_bytes,count_bytes` gives.
                let ddOut = dir.file("dd-\(name)-\(p.index)")
                try Tool.run("dd", ["if=\(path)", "of=\(ddOut)", "bs=64K", "skip=\(p.start)", "count=\(p.length)",
                                    "iflag=skip_bytes,count_bytes", "status=none"])
                let dd = try readFile(ddOut)
                #expect(dd.count == Int(p.length))
                for (off, count) in [(0, 4096), (1000, 70000), (Int(p.length) - 513, 513)] {
                    let got = try src.readBytes(at: UInt64(off), count: count)
                    #expect(got == Array(dd[off..<off + count]))
                    #expect(got == Array(file[Int(p.start) + off..<Int(p.start) + off + count]))
                }
                #expect(throws: CairnError.self) { try src.readBytes(at: p.length - 1, count: 2) }
                // Extents: the disk's map shifted into the window, covering it exactly.
                let ext = try src.allExtents()
                #expect(ext.first?.offset == 0 && ext.last?.end == p.length)
                for (a, b) in zip(ext, ext.dropFirst()) { #expect(a.end == b.offset) }
                let diskExt = try disk.extents(in: p.start..<p.end)
                #expect(ext == diskExt.map { Extent(offset: $0.offset - p.start, length: $0.length, kind: $0.kind) })
            }
        }
        // Windows past the end are refused; extents are clipped to the window.
        let mem = MemoryBlockSource([UInt8](repeating: 7, count: 4096),
                                    extents: [Extent(offset: 0, length: 1024, kind: .data), Extent(offset: 1024, length: 3072, kind: .zero)])
        #expect(throws: CairnError.self) { try PartitionSource(disk: mem, offset: 4000, length: 200) }
        let w = try PartitionSource(disk: mem, offset: 512, length: 1024)
        #expect(try w.allExtents() == [Extent(offset: 0, length: 512, kind: .data), Extent(offset: 512, length: 512, kind: .zero)])
        #expect(try w.extents(in: 600..<5000) == [Extent(offset: 600, length: 424, kind: .zero)])
    }

    /// Random damage never traps: the read either succeeds or throws a CairnError.
    @Test func randomMutationsNeverTrap() throws {
        let dir = try TempDir("fuzz")
        var rng = SeededRandom(seed: 0x5EED)
        for (script, name) in [(PartitionFixture.gptScript, "gpt.img"), (PartitionFixture.mbrScript, "mbr.img")] {
            let path = try PartitionFixture.make(script, in: dir, name: name)
            let full = try readFile(path)
            let head = Array(full[0..<65536])
            var outcomes = [0, 0]
            for i in 0..<2000 {
                var b = head
                // Mostly hit the structures (MBR, GPT header, entries), sometimes anywhere.
                for _ in 0..<Int.random(in: 1...8, using: &rng) {
                    let pos = Bool.random(using: &rng) ? Int.random(in: 0..<2048, using: &rng) : Int.random(in: 0..<b.count, using: &rng)
                    b[pos] = Bool.random(using: &rng) ? UInt8.random(in: 0...255, using: &rng) : b[pos] ^ (1 << UInt8.random(in: 0..<8, using: &rng))
                }
                if i % 10 == 0 { b = Array(b.prefix(Int.random(in: 0...b.count, using: &rng))) }
                do {
                    _ = try PartitionTable.read(MemoryBlockSource(b))
                    outcomes[0] += 1
                } catch is CairnError {
                    outcomes[1] += 1
                }
            }
            #expect(outcomes[0] + outcomes[1] == 2000)
            #expect(outcomes[0] > 0 && outcomes[1] > 0, "\(outcomes)")
            // The whole disk with its EBRs / backup GPT damaged as well (patched, not copied).
            let interesting = Set(([0, 512, 1024] + Self.ebrOffsets(full) + [full.count - 512, full.count - 16896]).filter { $0 >= 0 && $0 < full.count })
            let targets = Array(interesting).sorted()
            for _ in 0..<500 {
                var patches: [Int: UInt8] = [:]
                for _ in 0..<Int.random(in: 1...6, using: &rng) {
                    let base = targets[Int.random(in: 0..<targets.count, using: &rng)]
                    patches[min(full.count - 1, base + Int.random(in: 0..<512, using: &rng))] = UInt8.random(in: 0...255, using: &rng)
                }
                _ = try? PartitionTable.read(PatchedBlockSource(base: full, patches: patches))
            }
        }
    }
}

