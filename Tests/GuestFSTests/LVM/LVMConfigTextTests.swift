import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

@Suite struct LVMConfigTextTests {
    @Test func parsesSectionsValuesArraysAndComments() throws {
        let text = """
            # a comment
            top {
            \tn = 42   # trailing comment
            \tneg = -7
            \treal = 0.5
            \ts = "quote \\" and \\\\ backslash # not a comment"
            \tarr = ['a', 1, "b", 2,]
            \tempty = []
            \tbare = word
            \tinner { deep { x = 1 } }
            }
            after = "x"
            """
        let root = try LVMConfigText.parse(text)
        #expect(root.sections.count == 1)
        let top = try #require(root.section("top"))
        #expect(top.line == 2)
        #expect(top.value("n") == .integer(42))
        #expect(top.value("neg") == .integer(-7))
        #expect(top.value("real") == .real(0.5))
        #expect(top.value("s") == .string("quote \" and \\ backslash # not a comment"))
        #expect(top.value("arr") == .array([.string("a"), .integer(1), .string("b"), .integer(2)]))
        #expect(top.value("empty") == .array([]))
        #expect(top.value("bare") == .string("word"))
        #expect(top.section("inner")?.section("deep")?.value("x") == .integer(1))
        #expect(top.assignment("arr")?.line == 7)
        #expect(root.value("after") == .string("x"))
    }

    static func fails(_ text: String, _ words: [String], sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(sourceLocation: sourceLocation) {
            try LVMConfigText.parse(text)
        } throws: { error in
            guard let e = error as? CairnError else { return false }
            return e.code == .malformedImage && words.allSatisfy { e.message.contains($0) }
        }
    }

    @Test func errorsNameTheLine() {
        Self.fails("a {\n b = 1\n", ["line 3", "never closed", "\"a\""])
        Self.fails("a = 1\n}\n", ["line 2", "'}'"])
        Self.fails("a = \"open\n\n", ["line 1", "never closed"])
        Self.fails("x = [1, 2\n", ["line 2"])
        Self.fails("x = [1 2]", ["',' or ']'"])
        Self.fails("x = [[1]]", ["expected a value"])
        Self.fails("x 1", ["expected '=' or '{'"])
        Self.fails("= 1", ["expected a name"])
        Self.fails("x = 123456789012345678901234", ["not a number"])
        Self.fails("x =", ["expected a value"])
        Self.fails(String(repeating: "a {", count: 40) + String(repeating: "}", count: 40), ["nested deeper"])
    }

    @Test func nulEndsTheText() throws {
        let root = try LVMConfigText.parse(Array("a = 1\n".utf8) + [0] + Array("garbage {{{".utf8))
        #expect(root.value("a") == .integer(1))
    }

    @Test func checksumKnownAnswers() {
        // LVM2's calc_crc(INITIAL_CRC, "123456789", 9) and of nothing.
        #expect(LVMChecksum.checksum(Array("123456789".utf8)) == 0x4991_CF02)
        #expect(LVMChecksum.checksum([UInt8]()) == 0xF597_A6CF)
        let a = Array("hello ".utf8), b = Array("world".utf8)
        #expect(LVMChecksum.update(LVMChecksum.checksum(a), b) == LVMChecksum.checksum(a + b))
    }

    @Test func uuidForms() {
        #expect(LVMVolumeGroup.dashedUUID("ALrjgfzMoOGgW2P2rXGmkLuAyCD6HL7Q") == "ALrjgf-zMoO-GgW2-P2rX-GmkL-uAyC-D6HL7Q")
        #expect(LVMVolumeGroup.bareUUID("ALrjgf-zMoO-GgW2-P2rX-GmkL-uAyC-D6HL7Q") == "ALrjgfzMoOGgW2P2rXGmkLuAyCD6HL7Q")
    }

    /// Every file in fuzz/regressions/lvm goes through the fuzz target's path without a crash.
    @Test func fuzzRegressionsDoNotCrash() throws {
        // Resolved, so the path also works from a package that links this directory.
        let here = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath().deletingLastPathComponent()
        let dir = here.appendingPathComponent("../../../fuzz/regressions/lvm").standardized.path
        #expect(FileManager.default.fileExists(atPath: here.appendingPathComponent("../../../fuzz/targets/lvm.swift").standardized.path))
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        for name in files.sorted() {
            let bytes = try readFile((dir as NSString).appendingPathComponent(name))
            LVMFuzzInput.exercise(bytes)
            // The fuzz build does not enforce checksums: replay with them made right as well.
            LVMFuzzInput.exercise(LVMFuzzInput.resealed(bytes))
        }
        // The first finding: a metadata text listing LV "lin" twice (the second copy without
        // segments) gave two LVs of one name whose sources differed. Now refused.
        let first = (dir as NSString).appendingPathComponent("crash-8198ae04b9e74c691c8d02ca07f1dbd05065e3a0")
        if FileManager.default.fileExists(atPath: first) {
            let b = LVMFuzzInput.resealed(try readFile(first)) + [UInt8](repeating: 0, count: 2 << 20)
            #expect {
                try LVMPhysicalVolume(source: MemoryBlockSource(b))
            } throws: { error in
                (error as? CairnError)?.message.contains("\"lin\" is listed twice") ?? false
            }
        }
    }
}

/// The fuzz target's input decoding and exercise (fuzz/targets/lvm.swift), for replaying
/// regressions: the input is the first bytes of a 64 MiB volume whose remainder reads as zeros.
enum LVMFuzzInput {
    /// `input` with the label, metadata-area header and (unwrapped) text checksums recomputed,
    /// as far as the structures lie inside the input.
    static func resealed(_ input: [UInt8]) -> [UInt8] {
        var b = input
        func u64(_ o: Int) -> UInt64? { o >= 0 && o + 8 <= b.count ? LVMEdit.get64(b, o) : nil }
        for sector in 0..<4 where (sector + 1) * 512 <= b.count && Array(b[sector * 512..<sector * 512 + 8]) == Array("LABELONE".utf8) {
            let l = sector * 512
            let hdr = l + Int(LVMEdit.get32(b, l + 20) & 0x1FF)
            var pos = hdr + 40
            var lists = 0
            while lists < 2, pos + 16 <= l + 512, let off = u64(pos) {
                pos += 16
                guard off != 0 else { lists += 1; continue }
                guard lists == 1, off < UInt64(b.count), let mda = Int(exactly: off), mda + 512 <= b.count else { continue }
                if let to = u64(mda + 40), let ts = u64(mda + 48), to < (1 << 24), ts < (1 << 24),
                   mda + Int(to) + Int(ts) <= b.count, mda + 64 <= b.count {
                    LVMEdit.put32(LVMChecksum.checksum(b[mda + Int(to)..<mda + Int(to) + Int(ts)]), mda + 56, &b)
                }
                LVMEdit.resealHeader(&b, mda: mda)
            }
            LVMEdit.put32(LVMChecksum.checksum(b[l + 20..<l + 512]), l + 16, &b)
            break
        }
        return b
    }

    static func exercise(_ input: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) {
        var bytes = Array(input.prefix(4 << 20))
        bytes += [UInt8](repeating: 0, count: max(0, (8 << 20) - bytes.count))
        let source = MemoryBlockSource(bytes, name: "fuzz")
        guard let pv = try? LVMPhysicalVolume(source: source) else { return }
        var last: UInt64 = 0
        for r in pv.unusedRanges() {
            #expect(r.lowerBound >= last && r.lowerBound < r.upperBound && r.upperBound <= source.size && r.lowerBound >= 2048,
                    sourceLocation: sourceLocation)
            last = r.upperBound
        }
        guard let vg = pv.volumeGroup else { return }
        #expect(Set(vg.logicalVolumes.map(\.name)).count == vg.logicalVolumes.count, "LV names are unique", sourceLocation: sourceLocation)
        for lv in vg.logicalVolumes {
            guard let src = try? LogicalVolumeSource(volumeGroup: vg, logicalVolume: lv.name, physicalVolumes: [pv]) else { continue }
            #expect(src.size == lv.size, sourceLocation: sourceLocation)
            _ = try? src.readBytes(at: 0, count: Int(min(4096, src.size)))
            _ = try? src.readBytes(at: src.size - min(4096, src.size), count: Int(min(4096, src.size)))
            _ = try? src.extents(in: 0..<src.size)
        }
    }
}

/// Volume groups written by hand: segment types Cairn does not map, and many segments.
@Suite struct LVMSyntheticGroupTests {
    static let pvUUID = "AAAAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG"

    static func group(extentSize: Int = 8, peCount: Int = 100, lvs: String) -> String {
        """
        vg0 {
        id = "vgvgvg-vgvg-vgvg-vgvg-vgvg-vgvg-vgvgvg"
        seqno = 7
        extent_size = \(extentSize)
        physical_volumes {
        pv0 {
        id = "\(pvUUID)"
        pe_start = 8
        pe_count = \(peCount)
        }
        }
        logical_volumes {
        \(lvs)
        }
        }
        version = 1
        """
    }

    static func lv(_ name: String, _ segments: [String]) -> String {
        var s = "\(name) {\nid = \"\(name)\"\nstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\nsegment_count = \(segments.count)\n"
        for (i, seg) in segments.enumerated() { s += "segment\(i + 1) {\n\(seg)\n}\n" }
        return s + "}\n"
    }

    @Test func otherSegmentTypesAreListedRefusedAndAccounted() throws {
        let text = Self.group(lvs: [
            Self.lv("moved", ["start_extent = 0\nextent_count = 2\ntype = \"striped\"\nstripe_count = 1\nstripes = [\"pvmove0\", 0]"]),
            Self.lv("pvmove0", ["start_extent = 0\nextent_count = 2\ntype = \"mirror\"\nmirror_count = 2\nmirrors = [\"pv0\", 10, \"pv0\", 20]"]),
            Self.lv("r", ["start_extent = 0\nextent_count = 4\ntype = \"raid1\"\ndevice_count = 2\nraids = [\"r_rmeta_0\", \"r_rimage_0\"]"]),
            Self.lv("plain", ["start_extent = 0\nextent_count = 3\ntype = \"striped\"\nstripe_count = 1\nstripes = [\"pv0\", 40]"]),
        ].joined())
        let vg = try LVMVolumeGroup(text: text)
        #expect(vg.logicalVolumes.map(\.name) == ["moved", "pvmove0", "r", "plain"])
        #expect(vg.logicalVolume(named: "moved")?.unsupportedReason?.contains("pvmove") == true)
        #expect(vg.logicalVolume(named: "pvmove0")?.unsupportedReason?.contains("\"mirror\"") == true)
        #expect(vg.logicalVolume(named: "r")?.unsupportedReason?.contains("raid1") == true)
        #expect(vg.logicalVolume(named: "plain")?.unsupportedReason == nil)
        #expect(vg.opaquePVs.isEmpty)
        let used = (vg.usedAreas["pv0"] ?? []).map { $0.startExtent..<$0.startExtent + $0.extentCount }.sorted { $0.lowerBound < $1.lowerBound }
        #expect(used == [10..<12, 20..<22, 40..<43])
        let pv = MemoryBlockSource([UInt8](repeating: 0, count: 4096 + 100 * 4096))
        #expect(throws: CairnError.self) { try LogicalVolumeSource(volumeGroup: vg, logicalVolume: "moved", physicalVolumes: [Self.pvUUID: pv]) }
        #expect(try LogicalVolumeSource(volumeGroup: vg, logicalVolume: "plain", physicalVolumes: [Self.pvUUID: pv]).size == 3 * 4096)

        // An unknown type naming a PV directly makes that PV opaque.
        let odd = try LVMVolumeGroup(text: Self.group(lvs: Self.lv("x", ["start_extent = 0\nextent_count = 1\ntype = \"newfangled\"\nareas = [\"pv0\", 3]"])))
        #expect(odd.opaquePVs == ["pv0"])
    }

    /// 20,000 one-extent segments in reverse PV order: parsing, mapping and reads stay fast
    /// and exact.
    @Test func manySegments() throws {
        let n = 20_000
        var segments: [String] = []
        segments.reserveCapacity(n)
        for i in 0..<n {
            segments.append("start_extent = \(i)\nextent_count = 1\ntype = \"striped\"\nstripe_count = 1\nstripes = [\"pv0\", \(n - 1 - i)]")
        }
        let vg = try LVMVolumeGroup(text: Self.group(extentSize: 1, peCount: n, lvs: Self.lv("frag", segments)))
        var rng = SeededRandom(seed: 9)
        let disk = rng.bytes(4096 + n * 512)
        let src = try LogicalVolumeSource(volumeGroup: vg, logicalVolume: "frag", physicalVolumes: [Self.pvUUID: MemoryBlockSource(disk)])
        #expect(src.size == UInt64(n * 512))
        let all = try src.readBytes(at: 0, count: n * 512)
        var ok = true
        for i in 0..<n where all[i * 512..<(i + 1) * 512] != disk[4096 + (n - 1 - i) * 512..<4096 + (n - i) * 512] { ok = false }
        #expect(ok)
        #expect(try src.extents(in: 0..<src.size) == [Extent(offset: 0, length: src.size, kind: .data)])
    }
}
