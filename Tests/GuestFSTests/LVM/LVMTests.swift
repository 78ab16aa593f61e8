import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// The LVM suite makes loop devices and volume groups: serialized, and each fixture cleans up
/// in every outcome (see LVMFixture).
@Suite(.serialized) struct LVMTests {
    static let mib = 1 << 20

    /// Every field our parser reports equals LVM's own report.
    func checkAgainstReports(_ f: LVMFixture, _ pvs: [LVMPhysicalVolume]) throws {
        let vgRow = try #require(f.vgs.first)
        let vg = try #require(pvs.first?.volumeGroup)
        #expect(vg.name == vgRow["vg_name"])
        #expect(vg.uuid == vgRow["vg_uuid"])
        #expect(String(vg.seqno) == vgRow["vg_seqno"])
        #expect(String(vg.extentSize) == vgRow["vg_extent_size"])
        #expect(String(vg.physicalVolumes.count) == vgRow["pv_count"])
        #expect(String(vg.logicalVolumes.filter(\.isVisible).count) == vgRow["lv_count"])
        for (dev, i) in f.deviceIndex {
            let row = try #require(f.pvs.first { $0["pv_name"] == dev })
            let pv = pvs[i]
            #expect(pv.uuid == row["pv_uuid"])
            #expect(pv.volumeGroup == vg, "every PV carries the same metadata")
            #expect(String(pv.deviceSize) == row["dev_size"])
            let entry = try #require(vg.physicalVolume(uuid: pv.uuid))
            #expect(String(entry.peStart) == row["pe_start"])
            #expect(String(entry.peCount) == row["pv_pe_count"])
            #expect(pv.peStart == entry.peStart)
            // Unused ranges: exactly the free PV segments LVM reports, and pv_free in total.
            let free = pv.unusedRanges()
            #expect(String(free.reduce(0) { $0 + $1.count }) == row["pv_free"])
            var expected: [Range<UInt64>] = []
            for s in f.pvSegments where s["pv_name"] == dev && s["lv_name"] == "" {
                let a = entry.peStart + (UInt64(s["pvseg_start"] ?? "") ?? 0) * vg.extentSize
                let n = (UInt64(s["pvseg_size"] ?? "") ?? 0) * vg.extentSize
                if let last = expected.last, last.upperBound == a {
                    expected[expected.count - 1] = last.lowerBound..<a + n
                } else {
                    expected.append(a..<a + n)
                }
            }
            #expect(free == expected)
            // Never the label, the metadata areas or anything before pe_start.
            for r in free {
                #expect(r.lowerBound >= entry.peStart)
                for a in pv.metadataAreaLocations { #expect(r.upperBound <= a.offset || r.lowerBound >= a.offset + a.size) }
            }
        }
        // Logical volumes and segments.
        let names = Set(f.lvSegments.compactMap { $0["lv_name"] })
        #expect(Set(vg.logicalVolumes.map(\.name)) == names)
        for lv in vg.logicalVolumes {
            let rows = f.segments(of: lv.name)
            #expect(lv.segments.count == rows.count)
            #expect(lv.uuid == rows.first?["lv_uuid"])
            #expect(String(lv.size) == rows.first?["lv_size"])
            #expect(lv.unsupportedReason == nil)
            for (seg, row) in zip(lv.segments, rows) {
                #expect(String(seg.startExtent) == row["seg_start_pe"])
                #expect(String(seg.extentCount) == row["seg_size_pe"])
                #expect(String(seg.stripeCount) == row["stripes"])
                #expect(String(seg.stripeSize) == row["stripe_size"])
                #expect(row["segtype"] == (seg.stripeCount == 1 ? "linear" : "striped"))
                let ranges = LVMFixture.ranges(row["seg_pe_ranges"] ?? "")
                #expect(ranges.count == seg.stripes.count)
                for (stripe, (dev, first, last)) in zip(seg.stripes, ranges) {
                    let pv = try #require(vg.physicalVolume(named: stripe.pvName))
                    #expect(pvs[f.deviceIndex[dev] ?? -1].uuid == pv.uuid)
                    #expect(stripe.startExtent == first)
                    #expect(stripe.startExtent + stripe.extentCount - 1 == last)
                }
            }
        }
        // vgcfgbackup's text describes the same group.
        let backup = try LVMVolumeGroup(text: f.backupText, source: "vgcfgbackup")
        #expect(backup == vg)
    }

    /// Writes random content into every LV through LVM's report and reads it back through
    /// LogicalVolumeSource, in pieces that cross segment and stripe boundaries.
    func checkContent(_ f: LVMFixture) throws {
        var rng = SeededRandom(seed: 0x1F3)
        let vgBefore = try #require(try f.physicalVolumes().first?.volumeGroup)
        var contents: [String: [UInt8]] = [:]
        for lv in vgBefore.logicalVolumes {
            let c = rng.bytes(Int(lv.size))
            contents[lv.name] = c
            try f.write(c, to: lv.name)
        }
        let pvs = try f.physicalVolumes()
        let vg = try #require(pvs.first?.volumeGroup)
        for lv in vg.logicalVolumes {
            let src = try LogicalVolumeSource(volumeGroup: vg, logicalVolume: lv.name, physicalVolumes: pvs)
            #expect(src.size == lv.size)
            #expect(src.name == "\(vg.name)/\(lv.name)")
            let want = try #require(contents[lv.name])
            var got: [UInt8] = []
            var at: UInt64 = 0
            let step = Self.mib + 4097
            while at < src.size {
                let n = Int(min(UInt64(step), src.size - at))
                got += try src.readBytes(at: at, count: n)
                at += UInt64(n)
            }
            // Compared as one Bool: a failing #expect on 16 MiB arrays would print them.
            let same = got == want
            #expect(same, "content of \(lv.name) differs")
            // Small reads straddling chunk and extent boundaries.
            for o in [65536 - 3, 4 * Self.mib - 100, 8 * Self.mib - 1] where o + 200 <= Int(src.size) {
                let piece = try src.readBytes(at: UInt64(o), count: 200)
            #expect(piece == Array(want[o..<o + 200]))
            }
            #expect(throws: CairnError.self) { try src.readBytes(at: src.size - 1, count: 2) }
            // The physical ranges of a window hold exactly its bytes.
            let window = UInt64(Self.mib / 2)..<min(src.size, UInt64(5 * Self.mib + 777))
            let phys = try #require(src.physicalRanges(of: window))
            var viaPV: [UInt8] = []
            for (uuid, r) in phys {
                let pv = try #require(pvs.first { $0.uuid == uuid })
                viaPV += try pv.source.readBytes(at: r.lowerBound, count: Int(r.count))
            }
            let windowSame = viaPV == Array(want[Int(window.lowerBound)..<Int(window.upperBound)])
            #expect(windowSame)
            if lv.segments.contains(where: { $0.stripeCount > 1 }) { #expect(phys.count > 2) }
            #expect(src.physicalRanges(of: 0..<src.size, limit: 0) == nil)
            let ext = try src.allExtents()
            #expect(ext.first?.offset == 0 && ext.last?.end == src.size)
            for (a, b) in zip(ext, ext.dropFirst()) { #expect(a.end == b.offset) }
        }
    }

    @Test func linearAndFragmentedVolumesMatchLVM() throws {
        let f = try LVMFixture("lin", pvSizes: [64 * Self.mib], commands: [
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "8M", "-n", "lv1", "{vg}"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "4M", "-n", "gap", "{vg}"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "12M", "-n", "lv2", "{vg}"],
            ["lvextend", "-q", "-L", "+8M", "{vg}/lv1"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "4M", "-n", "lv.name+3_x", "{vg}"],
            ["lvremove", "-q", "-y", "{vg}/gap"],
        ])
        // The removed LV left a free extent between used ones.
        #expect(f.pvSegments.contains { $0["lv_name"] == "" && $0["pvseg_start"] == "2" }, "\(f.pvSegments)")
        let pvs = try f.physicalVolumes()
        let vg = try #require(pvs.first?.volumeGroup)
        #expect(vg.logicalVolume(named: "lv1")?.segments.count == 2, "lv1 is fragmented")
        #expect(pvs[0].labelSector == 1)
        #expect(pvs[0].warnings.isEmpty)
        #expect(LVMPhysicalVolume.probe(try FileBlockSource(path: f.images[0])))
        try checkAgainstReports(f, pvs)
        try checkContent(f)
    }

    @Test func stripedAcrossTwoPVsMatchesLVM() throws {
        let f = try LVMFixture("str", pvSizes: [40 * Self.mib, 48 * Self.mib], commands: [
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "16M", "-i2", "-I64k", "-n", "stripes", "{vg}"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "8M", "-n", "onlysecond", "{vg}", "{pv1}"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "8M", "-i2", "-I8k", "-n", "small", "{vg}"],
            ["lvextend", "-q", "-L", "+4M", "{vg}/onlysecond", "{pv0}"],
        ])
        let pvs = try f.physicalVolumes()
        let vg = try #require(pvs.first?.volumeGroup)
        #expect(vg.logicalVolume(named: "stripes")?.segments.first?.stripeCount == 2)
        try checkAgainstReports(f, pvs)
        try checkContent(f)
        // Without the second PV: a clear error naming it; an LV only on the first still opens.
        let first = [pvs[0]]
        #expect {
            try LogicalVolumeSource(volumeGroup: vg, logicalVolume: "stripes", physicalVolumes: first)
        } throws: { error in
            guard let e = error as? CairnError else { return false }
            return e.code == .notFound && e.message.contains(pvs[1].uuid) && e.message.contains("pv1")
        }
        #expect(throws: CairnError.self) { try LogicalVolumeSource(volumeGroup: vg, logicalVolume: "nosuchlv", physicalVolumes: pvs) }
        // Assembled from both PVs (in either order): one group, no PV missing.
        let groups = LVMVolumeGroup.assemble(pvs.reversed())
        #expect(groups.count == 1)
        #expect(groups.first?.members.map(\.uuid) == pvs.map(\.uuid))
        #expect(groups.first?.missing.isEmpty == true)
        #expect(try groups.first?.logicalVolume("stripes").size == 16 << 20)
        let partial = LVMVolumeGroup.assemble(first)
        #expect(partial.first?.missing.map(\.uuid) == [pvs[1].uuid])
    }

    /// A PV made with `--metadatacopies 0` carries no metadata: it joins the group another PV
    /// describes, and its unused extents come from that group's metadata.
    @Test func pvWithoutMetadataJoinsItsGroup() throws {
        let f = try LVMFixture("nomda", pvSizes: [24 * Self.mib, 24 * Self.mib], pvcreatePerPV: [[], ["--metadatacopies", "0"]], commands: [
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "8M", "-n", "across", "{vg}", "{pv1}", "{pv0}"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "20M", "-n", "spill", "{vg}", "{pv1}", "{pv0}"],
        ])
        let pvs = try f.physicalVolumes()
        #expect(pvs[0].volumeGroup != nil)
        #expect(pvs[1].volumeGroup == nil && pvs[1].metadataAreaLocations.isEmpty)
        #expect(pvs[1].unusedRanges().isEmpty, "nothing without metadata")
        let groups = LVMVolumeGroup.assemble([pvs[1], pvs[0]])
        let g = try #require(groups.first)
        #expect(groups.count == 1 && g.missing.isEmpty && g.members.count == 2)
        for (dev, i) in f.deviceIndex {
            let row = try #require(f.pvs.first { $0["pv_name"] == dev })
            #expect(String(g.unusedRanges(of: pvs[i]).reduce(0) { $0 + $1.count }) == row["pv_free"])
        }
        try checkContent(f)
    }

    @Test func twoMetadataCopiesAndWrappedText() throws {
        let f = try LVMFixture("mda", pvSizes: [32 * Self.mib], pvcreate: ["--metadatacopies", "2", "--metadatasize", "64k"], commands: [
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "8M", "-n", "a", "{vg}"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "4M", "-n", "b", "{vg}"],
        ])
        let pvs = try f.physicalVolumes()
        #expect(pvs[0].metadataAreas.count == 2)
        try checkAgainstReports(f, pvs)
        let good = try #require(pvs[0].volumeGroup)

        // Damage the first area's header: the second copy is used, with a warning.
        var b = try readFile(f.images[0])
        let mda = LVMEdit.firstMDA(b)
        b[mda + 100] ^= 0xFF
        let pv2 = try LVMPhysicalVolume(source: MemoryBlockSource(b, name: "damaged"))
        #expect(pv2.volumeGroup == good)
        #expect(pv2.warnings.contains { $0.contains("metadata area 1") && $0.contains("checksum") }, "\(pv2.warnings)")

        // Move the text so it wraps around the end of the circular buffer: same result.
        var w = try readFile(f.images[0])
        let areaSize = Int(LVMEdit.get64(w, mda + 32))
        let off = Int(LVMEdit.get64(w, mda + 40)), size = Int(LVMEdit.get64(w, mda + 48))
        let text = Array(w[mda + off..<mda + off + size])
        let newOff = areaSize - 700
        for (i, byte) in text.enumerated() {
            let pos = newOff + i < areaSize ? newOff + i : 512 + (newOff + i - areaSize)
            w[mda + pos] = byte
        }
        LVMEdit.put64(UInt64(newOff), mda + 40, &w)
        LVMEdit.resealHeader(&w, mda: mda)
        let wrapped = try LVMPhysicalVolume(source: MemoryBlockSource(w, name: "wrapped"))
        #expect(wrapped.volumeGroup == good)
        #expect(wrapped.metadataText == Array(text.dropLast()))
        #expect(wrapped.warnings.isEmpty)
    }

    /// Builds one small single-PV fixture for the hostile tests.
    static func smallFixture() throws -> (LVMFixture, [UInt8]) {
        let f = try LVMFixture("bad", pvSizes: [24 * mib], commands: [
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "8M", "-n", "one", "{vg}"],
            ["lvcreate", "-an", "-Zn", "-y", "-q", "-L", "4M", "-n", "two", "{vg}"],
        ])
        return (f, try readFile(f.images[0]))
    }

    static func throwsMalformed(_ bytes: [UInt8], containing words: [String], code: CairnError.Code = .malformedImage,
                                sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(sourceLocation: sourceLocation) {
            try LVMPhysicalVolume(source: MemoryBlockSource(bytes, name: "pv.img"))
        } throws: { error in
            guard let e = error as? CairnError else { return false }
            return e.code == code && words.allSatisfy { e.description.contains($0) }
        }
    }

    @Test func hostileLabelsAndAreas() throws {
        let (_, good) = try Self.smallFixture()
        #expect(try LVMPhysicalVolume(source: MemoryBlockSource(good)).volumeGroup != nil)
        let mda = LVMEdit.firstMDA(good)
        #expect(mda == 4096)

        var b = good
        b[512 + 40] ^= 1  // PV UUID: label checksum fails
        Self.throwsMalformed(b, containing: ["label", "checksum"])

        b = good
        b[mda + 30] ^= 1  // header start field: checksum fails
        Self.throwsMalformed(b, containing: ["metadata area 1", "checksum"])

        b = good
        LVMEdit.put64(UInt64(1 << 40), mda + 40, &b)  // text offset far outside the area
        LVMEdit.resealHeader(&b, mda: mda)
        Self.throwsMalformed(b, containing: ["text offset"])

        b = good
        LVMEdit.put64(UInt64.max - 5, mda + 48, &b)  // absurd text size
        LVMEdit.resealHeader(&b, mda: mda)
        Self.throwsMalformed(b, containing: ["text size"])

        b = good
        let off = Int(LVMEdit.get64(b, mda + 40))
        b[mda + off + 10] ^= 0x20  // the text itself: its checksum fails
        Self.throwsMalformed(b, containing: ["text checksum"])

        b = good
        LVMEdit.put64(UInt64(1 << 50), 512 + 32 + 40 + 16 + 16, &b)  // metadata area offset past the end
        LVMEdit.put32(LVMChecksum.checksum(b[512 + 20..<1024]), 512 + 16, &b)
        Self.throwsMalformed(b, containing: ["does not fit"])

        b = good
        LVMEdit.put32(9, mda + 20, &b)  // header version
        LVMEdit.resealHeader(&b, mda: mda)
        Self.throwsMalformed(b, containing: ["version 9"], code: .unsupported)

        b = good
        LVMEdit.put32(600, 512 + 20, &b)  // PV header offset outside the sector
        LVMEdit.put32(LVMChecksum.checksum(b[512 + 20..<1024]), 512 + 16, &b)
        Self.throwsMalformed(b, containing: ["PV header offset"])

        // An area list with no terminator runs into the end of the sector.
        b = good
        for o in stride(from: 512 + 72, to: 1024, by: 8) { LVMEdit.put64(4096, o, &b) }
        LVMEdit.put32(LVMChecksum.checksum(b[512 + 20..<1024]), 512 + 16, &b)
        #expect(throws: CairnError.self) { try LVMPhysicalVolume(source: MemoryBlockSource(b)) }

        // Truncated images.
        for n in [0, 100, 1500, 3000, 5000, mda + 2000] {
            #expect(throws: CairnError.self) { try LVMPhysicalVolume(source: MemoryBlockSource(Array(good.prefix(n)))) }
            if n < 2048 { #expect(!LVMPhysicalVolume.probe(MemoryBlockSource(Array(good.prefix(n))))) }
        }
        // Cut inside the extents: the PV opens, an LV past the end does not.
        let cut = try LVMPhysicalVolume(source: MemoryBlockSource(Array(good.prefix(6 * Self.mib)), name: "cut"))
        let vg = try #require(cut.volumeGroup)
        #expect {
            try LogicalVolumeSource(volumeGroup: vg, logicalVolume: "one", physicalVolumes: [cut])
        } throws: { error in
            (error as? CairnError).map { $0.code == .malformedImage && $0.message.contains("past the end") } ?? false
        }
        #expect(cut.unusedRanges().allSatisfy { $0.upperBound <= 6 * UInt64(Self.mib) })
        #expect(!LVMPhysicalVolume.probe(MemoryBlockSource([UInt8](repeating: 0, count: 4096))))
    }

    @Test func hostileMetadataText() throws {
        let (_, good) = try Self.smallFixture()
        func edited(_ t: (String) -> String) -> [UInt8] {
            var b = good
            LVMEdit.rewriteText(&b, t)
            return b
        }
        // The rewrite itself keeps a valid PV.
        #expect(try LVMPhysicalVolume(source: MemoryBlockSource(edited { $0 })).volumeGroup?.logicalVolumes.count == 2)

        func replacingFirst(_ s: String, _ a: String, _ b: String) -> String {
            guard let r = s.range(of: a) else { return s }
            return s.replacingCharacters(in: r, with: b)
        }
        // Absurd extent counts.
        Self.throwsMalformed(edited { replacingFirst($0, "extent_count = 2", "extent_count = 99999999999999") }, containing: ["past the PV"])
        Self.throwsMalformed(edited { replacingFirst($0, "extent_count = 2", "extent_count = 99999999999999999999") }, containing: ["not a number"])
        Self.throwsMalformed(edited { replacingFirst($0, "extent_size = 8192", "extent_size = 9223372036854775807") }, containing: ["overflow"])
        Self.throwsMalformed(edited { replacingFirst($0, "extent_size = 8192", "extent_size = 0") }, containing: ["extent_size"])
        // A segment pointing past the PV's extents.
        Self.throwsMalformed(edited { replacingFirst($0, "\"pv0\", 0", "\"pv0\", 4000") }, containing: ["past the PV"])
        // A stripe on a PV the group does not list.
        Self.throwsMalformed(edited { replacingFirst($0, "\"pv0\", 0", "\"pv7\", 0") }, containing: ["pv7"])
        // Text that never closes a brace (the last one removed), and garbage.
        Self.throwsMalformed(edited { s in String(s[..<(s.lastIndex(of: "}") ?? s.endIndex)]) }, containing: ["never closed", "line"])
        Self.throwsMalformed(edited { replacingFirst($0, "seqno", "seqno seqno") }, containing: ["line 3"])
        Self.throwsMalformed(edited { $0 + "\nbroken = \"never" }, containing: ["never closed"])
        // Segments that do not tile the LV.
        Self.throwsMalformed(edited { replacingFirst($0, "start_extent = 0", "start_extent = 1") }, containing: ["tile"])
        // A huge pe_count is accepted by the parser but the LV then lies past the image end.
        let big = try LVMPhysicalVolume(source: MemoryBlockSource(edited {
            replacingFirst(replacingFirst($0, "pe_count = 5", "pe_count = 500000"), "\"pv0\", 0", "\"pv0\", 400000")
        }))
        let bigVG = try #require(big.volumeGroup)
        #expect(throws: CairnError.self) { try LogicalVolumeSource(volumeGroup: bigVG, logicalVolume: "one", physicalVolumes: [big]) }
        #expect(big.unusedRanges().allSatisfy { $0.upperBound <= UInt64(good.count) })

        // An unsupported segment type: listed with a reason, refused, the other LV still reads,
        // and no extent of the PV it names is reported unused.
        let thin = try LVMPhysicalVolume(source: MemoryBlockSource(edited { replacingFirst($0, "type = \"striped\"", "type = \"thin-pool\"") }))
        let tvg = try #require(thin.volumeGroup)
        let one = try #require(tvg.logicalVolume(named: "one"))
        #expect(one.unsupportedReason?.contains("thin-pool") == true)
        #expect {
            try LogicalVolumeSource(volumeGroup: tvg, logicalVolume: "one", physicalVolumes: [thin])
        } throws: { error in
            (error as? CairnError).map { $0.code == .unsupported && $0.message.contains("thin-pool") } ?? false
        }
        #expect(try LogicalVolumeSource(volumeGroup: tvg, logicalVolume: "two", physicalVolumes: [thin]).size == 4 << 20)
        #expect(thin.unusedRanges().isEmpty)
        // The PV must be listed by its own metadata.
        Self.throwsMalformed(edited { s in
            let id = LVMVolumeGroup.dashedUUID(String(decoding: good[512 + 32..<512 + 64], as: UTF8.self))
            return s.replacingOccurrences(of: id, with: "AAAAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAAAA")
        }, containing: ["does not list this PV"])
    }

    /// Random damage to the label, PV header, area header and text never traps.
    @Test func randomMutationsNeverTrap() throws {
        let (_, good) = try Self.smallFixture()
        let mda = LVMEdit.firstMDA(good)
        let off = Int(LVMEdit.get64(good, mda + 40)), size = Int(LVMEdit.get64(good, mda + 48))
        let head = Array(good.prefix(1 << 20))  // label and the whole first metadata area
        var rng = SeededRandom(seed: 0x11F)
        var outcomes = [0, 0]
        for i in 0..<1500 {
            var b = head
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let pos: Int
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: pos = 512 + Int.random(in: 0..<512, using: &rng)
                case 1: pos = mda + Int.random(in: 0..<64, using: &rng)
                default: pos = mda + off + Int.random(in: 0..<size, using: &rng)
                }
                b[pos] = Bool.random(using: &rng) ? UInt8.random(in: 0...255, using: &rng) : b[pos] ^ (1 << UInt8.random(in: 0..<8, using: &rng))
            }
            // Keep the checksums right half of the time so the parsers behind them are reached.
            if i % 2 == 0 {
                LVMEdit.put32(LVMChecksum.checksum(b[512 + 20..<1024]), 512 + 16, &b)
                LVMEdit.resealHeader(&b, mda: mda)
                if LVMEdit.get64(b, mda + 40) == UInt64(off) && LVMEdit.get64(b, mda + 48) == UInt64(size) { LVMEdit.put32(LVMChecksum.checksum(b[mda + off..<mda + off + size]), mda + 56, &b) }
            }
            do {
                let pv = try LVMPhysicalVolume(source: SplicedSource(head: b, rest: good))
                _ = pv.unusedRanges()
                if let vg = pv.volumeGroup {
                    for lv in vg.logicalVolumes {
                        if let src = try? LogicalVolumeSource(volumeGroup: vg, logicalVolume: lv.name, physicalVolumes: [pv]) {
                            _ = try? src.readBytes(at: 0, count: Int(min(4096, src.size)))
                        }
                    }
                }
                outcomes[0] += 1
            } catch is CairnError {
                outcomes[1] += 1
            }
        }
        #expect(outcomes[0] > 0 && outcomes[1] > 0, "\(outcomes)")
    }
}

/// `rest` with its first `head.count` bytes replaced by `head` (no copy of `rest`).
private struct SplicedSource: BlockSource {
    let head: [UInt8]
    let rest: [UInt8]
    var size: UInt64 { UInt64(rest.count) }
    var name: String { "spliced" }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        let start = Int(offset)
        for i in 0..<buffer.count {
            let k = start + i
            buffer[i] = k < head.count ? head[k] : rest[k]
        }
    }

    func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        return [Extent(offset: range.lowerBound, length: end - range.lowerBound, kind: .data)]
    }
}
