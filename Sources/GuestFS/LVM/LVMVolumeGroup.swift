import CairnCore

/// A physical volume as the volume group metadata lists it (`physical_volumes { pvN { ... } }`).
package struct LVMPhysicalVolumeEntry: Sendable, Equatable {
    /// The metadata's own name for it ("pv0"), which segments use.
    package var name: String
    /// PV UUID in LVM's dashed text form (6-4-4-4-4-4-6 characters).
    package var uuid: String
    /// The device path when the metadata was written (a hint only).
    package var device: String?
    /// Device size in bytes (`dev_size` is in 512-byte sectors), nil when absent.
    package var deviceSize: UInt64?
    /// Byte offset of physical extent 0 on the PV (`pe_start` is in sectors).
    package var peStart: UInt64
    package var peCount: UInt64
    package var status: [String]
}

/// One PV area of a segment: `extentCount` extents from `startExtent` on PV `pvName`.
package struct LVMPVArea: Sendable, Equatable {
    package var pvName: String
    package var startExtent: UInt64
    package var extentCount: UInt64
}

/// One segment of a logical volume (`segmentN { ... }`).
package struct LVMSegment: Sendable, Equatable {
    /// First logical extent of the LV this segment covers.
    package var startExtent: UInt64
    package var extentCount: UInt64
    /// `type`: "striped" (linear is striped with one stripe), or one Cairn does not map.
    package var type: String
    /// For striped segments: number of stripes (1 = linear), chunk size in bytes (0 for
    /// linear) and the stripes, each `extentCount / stripeCount` extents long.
    package var stripeCount: Int
    package var stripeSize: UInt64
    package var stripes: [LVMPVArea]

    package var isStriped: Bool { type == "striped" }
}

/// A logical volume: its segments in logical order, and why it cannot be read when it uses a
/// segment type Cairn does not map.
package struct LVMLogicalVolume: Sendable, Equatable {
    package var name: String
    package var uuid: String
    package var status: [String]
    package var segments: [LVMSegment]
    /// Total logical extents (the segments cover `0..<extentCount` without gaps).
    package var extentCount: UInt64
    /// Size in bytes.
    package var size: UInt64
    /// Seconds since the epoch when the LV was created (`creation_time`), if recorded.
    package var creationTime: Int64?
    package var creationHost: String?
    /// Non-nil when Cairn cannot read this LV (thin, RAID, mirror, snapshot, cache, or an LV
    /// being moved): the message says which segment type.
    package var unsupportedReason: String?

    package var isVisible: Bool { status.contains("VISIBLE") }
}

/// A volume group parsed from its metadata text: the physical volumes, the logical volumes
/// and their segments. Structural damage (missing or out-of-range fields, segments that do
/// not tile their LV, stripes on PVs the group does not list or past a PV's extents) is a
/// thrown `.malformedImage`; an LV with an unsupported segment type is listed with an
/// `unsupportedReason` so the others can still be read.
package struct LVMVolumeGroup: Sendable, Equatable {
    package var name: String
    package var uuid: String
    package var seqno: UInt64
    /// Extent size in bytes (`extent_size` is in sectors).
    package var extentSize: UInt64
    package var status: [String]
    package var physicalVolumes: [LVMPhysicalVolumeEntry]
    package var logicalVolumes: [LVMLogicalVolume]
    /// PV areas used by segments that map PVs directly (striped stripes, the legs of the old
    /// "mirror" type), per PV name.
    package var usedAreas: [String: [LVMPVArea]]
    /// PVs referenced by a segment type whose areas Cairn cannot size: none of their extents
    /// is reported unused.
    package var opaquePVs: Set<String>

    package static let maxPhysicalVolumes = 4096
    package static let maxLogicalVolumes = 65536
    package static let maxSegments = 1_000_000
    /// LVM's own limit on stripes per segment.
    package static let maxStripes = 128
    /// LVM text names this format version.
    package static let textVersion: Int64 = 1

    package init(name: String, uuid: String, seqno: UInt64, extentSize: UInt64, status: [String],
                 physicalVolumes: [LVMPhysicalVolumeEntry], logicalVolumes: [LVMLogicalVolume],
                 usedAreas: [String: [LVMPVArea]], opaquePVs: Set<String>) {
        self.name = name
        self.uuid = uuid
        self.seqno = seqno
        self.extentSize = extentSize
        self.status = status
        self.physicalVolumes = physicalVolumes
        self.logicalVolumes = logicalVolumes
        self.usedAreas = usedAreas
        self.opaquePVs = opaquePVs
    }

    /// Parses metadata text (as stored in a metadata area or written by `vgcfgbackup`).
    package init(text: [UInt8], source: String = "LVM metadata", offset: UInt64? = nil) throws {
        try self.init(root: try LVMConfigText.parse(text, source: source, offset: offset), source: source, offset: offset)
    }

    package init(text: String, source: String = "LVM metadata") throws {
        try self.init(text: Array(text.utf8), source: source)
    }

    /// The volume group of a parsed text: the one top-level section.
    package init(root: LVMConfigSection, source: String = "LVM metadata", offset: UInt64? = nil) throws {
        var parser = VGParser(source: source, offset: offset)
        self = try parser.volumeGroup(root)
    }

    /// The PV entry with this UUID (dashes optional, as in the PV label).
    package func physicalVolume(uuid: String) -> LVMPhysicalVolumeEntry? {
        let key = LVMVolumeGroup.bareUUID(uuid)
        return physicalVolumes.first { LVMVolumeGroup.bareUUID($0.uuid) == key }
    }

    package func physicalVolume(named name: String) -> LVMPhysicalVolumeEntry? {
        physicalVolumes.first { $0.name == name }
    }

    package func logicalVolume(named name: String) -> LVMLogicalVolume? {
        logicalVolumes.first { $0.name == name }
    }

    /// A UUID without its dashes (the label's form).
    package static func bareUUID(_ s: String) -> String { s.filter { $0 != "-" } }

    /// The dashed text form LVM prints (6-4-4-4-4-4-6) of a 32-character UUID.
    package static func dashedUUID(_ bare: String) -> String {
        let c = Array(bare)
        guard c.count == 32 else { return bare }
        var out = ""
        var i = 0
        for (k, n) in [6, 4, 4, 4, 4, 4, 6].enumerated() {
            if k > 0 { out.append("-") }
            out += String(c[i..<i + n])
            i += n
        }
        return out
    }
}

/// Reads the volume-group structure out of the parsed text, checking every number.
private struct VGParser {
    let source: String
    let offset: UInt64?
    var segmentTotal = 0

    init(source: String, offset: UInt64?) {
        self.source = source
        self.offset = offset
    }

    func fail(_ message: String, line: Int) -> CairnError {
        CairnError(.malformedImage, "LVM metadata line \(line): \(message)", path: source, offset: offset,
                   hint: "the volume group metadata is damaged; `vgck` or `vgcfgrestore` on a restored copy may repair it")
    }

    func string(_ s: LVMConfigSection, _ key: String, what: String) throws -> String {
        guard let a = s.assignment(key) else { throw fail("\(what) has no \"\(key)\"", line: s.line) }
        guard let v = a.value.string else { throw fail("\"\(key)\" of \(what) is not a string", line: a.line) }
        return v
    }

    func unsigned(_ s: LVMConfigSection, _ key: String, what: String) throws -> UInt64 {
        guard let a = s.assignment(key) else { throw fail("\(what) has no \"\(key)\"", line: s.line) }
        guard let v = a.value.integer, let u = UInt64(exactly: v) else {
            throw fail("\"\(key)\" of \(what) is not a non-negative integer", line: a.line)
        }
        return u
    }

    func optionalUnsigned(_ s: LVMConfigSection, _ key: String, what: String) throws -> UInt64? {
        s.assignment(key) == nil ? nil : try unsigned(s, key, what: what)
    }

    func strings(_ s: LVMConfigSection, _ key: String) -> [String] {
        s.value(key)?.array?.compactMap(\.string) ?? []
    }

    func sectors(_ n: UInt64, _ key: String, what: String, line: Int) throws -> UInt64 {
        guard let b = mul(n, 512) else { throw fail("\"\(key)\" of \(what) (\(n) sectors) overflows a byte count", line: line) }
        return b
    }

    mutating func volumeGroup(_ root: LVMConfigSection) throws -> LVMVolumeGroup {
        if let v = root.assignment("version"), v.value != .integer(LVMVolumeGroup.textVersion) {
            throw CairnError(.unsupported, "LVM metadata text version \(v.value) is not supported (only version 1)", path: source, offset: offset)
        }
        guard root.sections.count == 1, let vg = root.sections.first else {
            throw fail("expected exactly one volume group section, found \(root.sections.count)", line: 1)
        }
        let what = "volume group \"\(vg.name)\""
        let uuid = try string(vg, "id", what: what)
        let seqno = try unsigned(vg, "seqno", what: what)
        if let f = vg.value("format")?.string, f != "lvm2" {
            throw CairnError(.unsupported, "\(what) uses metadata format \"\(f)\"; only lvm2 is supported", path: source, offset: offset)
        }
        let extentSectors = try unsigned(vg, "extent_size", what: what)
        let esLine = vg.assignment("extent_size")?.line ?? vg.line
        guard extentSectors > 0 else { throw fail("extent_size of \(what) is 0", line: esLine) }
        let extentSize = try sectors(extentSectors, "extent_size", what: what, line: esLine)

        var pvs: [LVMPhysicalVolumeEntry] = []
        var pvIndex: [String: Int] = [:]
        if let list = vg.section("physical_volumes") {
            guard list.sections.count <= LVMVolumeGroup.maxPhysicalVolumes else {
                throw fail("\(what) lists \(list.sections.count) physical volumes, more than \(LVMVolumeGroup.maxPhysicalVolumes)", line: list.line)
            }
            for s in list.sections {
                let pwhat = "physical volume \"\(s.name)\""
                let id = try string(s, "id", what: pwhat)
                let peStartSectors = try unsigned(s, "pe_start", what: pwhat)
                let peCount = try unsigned(s, "pe_count", what: pwhat)
                let line = s.assignment("pe_start")?.line ?? s.line
                let peStart = try sectors(peStartSectors, "pe_start", what: pwhat, line: line)
                guard let area = mul(peCount, extentSize), add(peStart, area) != nil else {
                    throw fail("\(pwhat): pe_start + pe_count extents overflows", line: s.assignment("pe_count")?.line ?? s.line)
                }
                var devSize: UInt64?
                if let d = try optionalUnsigned(s, "dev_size", what: pwhat) {
                    devSize = try sectors(d, "dev_size", what: pwhat, line: s.assignment("dev_size")?.line ?? s.line)
                }
                guard pvIndex[s.name] == nil else { throw fail("physical volume \"\(s.name)\" is listed twice", line: s.line) }
                pvIndex[s.name] = pvs.count
                pvs.append(LVMPhysicalVolumeEntry(name: s.name, uuid: id, device: s.value("device")?.string, deviceSize: devSize,
                                                  peStart: peStart, peCount: peCount, status: strings(s, "status")))
            }
        }

        var lvs: [LVMLogicalVolume] = []
        var used: [String: [LVMPVArea]] = [:]
        var opaque: Set<String> = []
        if let list = vg.section("logical_volumes") {
            guard list.sections.count <= LVMVolumeGroup.maxLogicalVolumes else {
                throw fail("\(what) lists \(list.sections.count) logical volumes, more than \(LVMVolumeGroup.maxLogicalVolumes)", line: list.line)
            }
            var lvNames: Set<String> = []
            for s in list.sections {
                guard lvNames.insert(s.name).inserted else { throw fail("logical volume \"\(s.name)\" is listed twice", line: s.line) }
            }
            for s in list.sections {
                let lv = try logicalVolume(s, extentSize: extentSize, pvs: pvs, pvIndex: pvIndex, lvNames: lvNames,
                                           used: &used, opaque: &opaque)
                lvs.append(lv)
            }
        }
        return LVMVolumeGroup(name: vg.name, uuid: uuid, seqno: seqno, extentSize: extentSize, status: strings(vg, "status"),
                              physicalVolumes: pvs, logicalVolumes: lvs, usedAreas: used, opaquePVs: opaque)
    }

    mutating func logicalVolume(_ s: LVMConfigSection, extentSize: UInt64, pvs: [LVMPhysicalVolumeEntry], pvIndex: [String: Int],
                                lvNames: Set<String>, used: inout [String: [LVMPVArea]], opaque: inout Set<String>) throws -> LVMLogicalVolume {
        let what = "logical volume \"\(s.name)\""
        let id = try string(s, "id", what: what)
        var segments: [LVMSegment] = []
        var unsupported: String?
        for seg in s.sections {
            segmentTotal += 1
            guard segmentTotal <= LVMVolumeGroup.maxSegments else {
                throw fail("more than \(LVMVolumeGroup.maxSegments) segments in the volume group", line: seg.line)
            }
            let swhat = "\(what) \(seg.name)"
            let start = try unsigned(seg, "start_extent", what: swhat)
            let count = try unsigned(seg, "extent_count", what: swhat)
            let type = try string(seg, "type", what: swhat)
            guard count > 0 else { throw fail("\(swhat) has extent_count 0", line: seg.assignment("extent_count")?.line ?? seg.line) }
            var segment = LVMSegment(startExtent: start, extentCount: count, type: type, stripeCount: 0, stripeSize: 0, stripes: [])
            if type == "striped" {
                try striped(seg, &segment, what: swhat, extentSize: extentSize, pvs: pvs, pvIndex: pvIndex, lvNames: lvNames)
                if segment.stripes.contains(where: { pvIndex[$0.pvName] == nil }) {
                    // A stripe on another LV: pvmove's temporary mirror holds the data meanwhile.
                    unsupported = unsupported ?? "\(swhat) maps onto another logical volume (a pvmove in progress?); finish or abort the move first"
                } else {
                    for a in segment.stripes { used[a.pvName, default: []].append(a) }
                }
            } else {
                unsupported = unsupported ?? "\(swhat) has segment type \"\(type)\", which Cairn does not read (only linear and striped)"
                // Account for the PV extents such segments use, as far as we can size them.
                accountOpaque(seg, type: type, count: count, pvIndex: pvIndex, used: &used, opaque: &opaque)
            }
            segments.append(segment)
        }
        guard !segments.isEmpty else { throw fail("\(what) has no segments", line: s.line) }
        segments.sort { $0.startExtent < $1.startExtent }
        var next: UInt64 = 0
        for seg in segments {
            guard seg.startExtent == next else {
                throw fail("\(what): segments do not tile the volume (expected one starting at extent \(next), found \(seg.startExtent))", line: s.line)
            }
            guard let n = add(next, seg.extentCount) else { throw fail("\(what): extent count overflows", line: s.line) }
            next = n
        }
        guard let size = mul(next, extentSize) else {
            throw fail("\(what): \(next) extents of \(extentSize) bytes overflow a byte count", line: s.line)
        }
        if let declared = s.value("segment_count")?.integer, declared != Int64(segments.count) {
            throw fail("\(what) declares segment_count \(declared) but has \(segments.count) segments", line: s.assignment("segment_count")?.line ?? s.line)
        }
        return LVMLogicalVolume(name: s.name, uuid: id, status: strings(s, "status"), segments: segments, extentCount: next, size: size,
                                creationTime: s.value("creation_time")?.integer, creationHost: s.value("creation_host")?.string,
                                unsupportedReason: unsupported)
    }

    func striped(_ seg: LVMConfigSection, _ segment: inout LVMSegment, what: String, extentSize: UInt64,
                 pvs: [LVMPhysicalVolumeEntry], pvIndex: [String: Int], lvNames: Set<String>) throws {
        let n = try unsigned(seg, "stripe_count", what: what)
        let nLine = seg.assignment("stripe_count")?.line ?? seg.line
        guard n >= 1, n <= UInt64(LVMVolumeGroup.maxStripes) else {
            throw fail("\(what) has stripe_count \(n), outside 1...\(LVMVolumeGroup.maxStripes)", line: nLine)
        }
        guard segment.extentCount % n == 0 else {
            throw fail("\(what): extent_count \(segment.extentCount) is not a multiple of stripe_count \(n)", line: nLine)
        }
        let areaExtents = segment.extentCount / n
        var stripeSize: UInt64 = 0
        if n > 1 {
            let ss = try unsigned(seg, "stripe_size", what: what)
            let ssLine = seg.assignment("stripe_size")?.line ?? seg.line
            stripeSize = try sectors(ss, "stripe_size", what: what, line: ssLine)
            guard stripeSize > 0 else { throw fail("\(what) has stripe_size 0", line: ssLine) }
            // The device-mapper stripe target needs each stripe's length to be whole chunks.
            guard let areaBytes = mul(areaExtents, extentSize), areaBytes % stripeSize == 0 else {
                throw fail("\(what): a stripe of \(areaExtents) extents is not a whole number of \(stripeSize)-byte chunks", line: ssLine)
            }
        }
        guard let list = seg.assignment("stripes"), let items = list.value.array else {
            throw fail("\(what) has no \"stripes\" array", line: seg.line)
        }
        guard UInt64(items.count) == 2 * n else {
            throw fail("\(what): \"stripes\" has \(items.count) elements, expected \(2 * n) (a name and an extent per stripe)", line: list.line)
        }
        var stripes: [LVMPVArea] = []
        for k in 0..<Int(n) {
            guard let name = items[2 * k].string, let e = items[2 * k + 1].integer, let start = UInt64(exactly: e) else {
                throw fail("\(what): stripe \(k) is not a (name, extent) pair", line: list.line)
            }
            if let i = pvIndex[name] {
                let pv = pvs[i]
                guard let end = add(start, areaExtents), end <= pv.peCount else {
                    throw fail("\(what): stripe \(k) (extents \(start)..<\(start &+ areaExtents) of \(name)) lies past the PV's \(pv.peCount) extents",
                               line: list.line)
                }
            } else if !lvNames.contains(name) {
                throw fail("\(what): stripe \(k) names \"\(name)\", which is neither a physical volume of the group nor a logical volume", line: list.line)
            }
            stripes.append(LVMPVArea(pvName: name, startExtent: start, extentCount: areaExtents))
        }
        segment.stripeCount = Int(n)
        segment.stripeSize = stripeSize
        segment.stripes = stripes
    }

    /// Segments Cairn does not map may still own PV extents. The old "mirror" type (pvmove)
    /// lists legs as (PV, extent) pairs, each `extent_count` long; for any other type, a PV
    /// named in one of its arrays is marked opaque (no extent of it counts as unused).
    func accountOpaque(_ seg: LVMConfigSection, type: String, count: UInt64, pvIndex: [String: Int],
                       used: inout [String: [LVMPVArea]], opaque: inout Set<String>) {
        for a in seg.assignments {
            guard let items = a.value.array else { continue }
            for (i, item) in items.enumerated() {
                guard let name = item.string, pvIndex[name] != nil else { continue }
                if type == "mirror", a.key == "mirrors", i + 1 < items.count, let e = items[i + 1].integer,
                   let start = UInt64(exactly: e) {
                    used[name, default: []].append(LVMPVArea(pvName: name, startExtent: start, extentCount: count))
                } else {
                    opaque.insert(name)
                }
            }
        }
    }
}
