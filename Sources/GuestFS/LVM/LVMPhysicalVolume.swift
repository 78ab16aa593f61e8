import CairnCore

/// LVM2's checksum (lib/misc/crc.c): the reflected CRC-32 of zlib (polynomial 0xEDB88320)
/// started at 0xF597A6CF and with no final inversion. Chaining `update` over two pieces gives
/// the checksum of their concatenation (metadata text that wraps around its area).
package enum LVMChecksum {
    package static let initial: UInt32 = 0xF597_A6CF

    package static func update<C: Collection>(_ crc: UInt32, _ bytes: C) -> UInt32 where C.Element == UInt8 {
        var c = crc
        let table = CRC32.table
        for b in bytes { c = table[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        return c
    }

    package static func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        update(initial, bytes)
    }

    /// Whether checksums are enforced (false only in the fuzz build, as for CRC-32C).
    static var enforced: Bool { CRC32C.enforced }
}

/// A `(offset, size)` pair of the PV header's area lists, in bytes from the PV's start. A data
/// area of size 0 runs to the end of the device.
package struct LVMDiskArea: Sendable, Equatable {
    package var offset: UInt64
    package var size: UInt64
}

/// One metadata area of a PV: where the label says it is, what its header says, and the
/// location of the current metadata text inside it.
package struct LVMMetadataArea: Sendable, Equatable {
    /// Area bytes on the PV (from the PV header).
    package var area: LVMDiskArea
    /// The area size the header records (the circular buffer wraps at this size).
    package var headerSize: UInt64
    /// First raw location: the committed metadata text (offset from the area start, size in
    /// bytes including the terminating NUL, checksum, flags); nil when the area holds none.
    package var textOffset: UInt64?
    package var textSize: UInt64
    package var textChecksum: UInt32
    /// RAW_LOCN_IGNORED: the area is kept but not used for metadata (`pvchange --metadataignore`).
    package var ignored: Bool
}

/// An LVM2 physical volume: the label, the PV header and the volume group metadata it carries.
///
/// On-disk layout (docs/LVM.md): a 512-byte label in one of sectors 0-3 ("LABELONE", its
/// sector number, a CRC of the rest of the sector, the PV header's offset, "LVM2 001"); the PV
/// header (UUID, device size, NUL-terminated lists of data areas and metadata areas, and an
/// extension with bootloader areas); each metadata area starts with a 512-byte header
/// (checksum, magic " LVM2 x[5A%r0N*>", version 1, start, size, raw locations) followed by a
/// circular buffer of metadata text.
package struct LVMPhysicalVolume: Sendable {
    package let source: any BlockSource
    /// The 512-byte sector (0-3) that holds the label.
    package let labelSector: UInt64
    /// PV UUID in dashed text form.
    package let uuid: String
    /// Device size recorded in the PV header, in bytes.
    package let deviceSize: UInt64
    package let dataAreas: [LVMDiskArea]
    /// Every metadata area the PV header lists (also those whose header could not be read).
    package let metadataAreaLocations: [LVMDiskArea]
    /// The metadata areas whose header was read.
    package let metadataAreas: [LVMMetadataArea]
    package let bootloaderAreas: [LVMDiskArea]
    /// PV header extension version (0 when there is none) and flags (bit 0: PV is in use by a VG).
    package let extensionVersion: UInt32
    package let extensionFlags: UInt32
    /// The current metadata text (from the area with the highest seqno), without its NUL.
    package let metadataText: [UInt8]?
    /// The volume group that text describes; nil for a PV without metadata (an orphan, or one
    /// created with `--metadatacopies 0` whose VG is described on other PVs).
    package let volumeGroup: LVMVolumeGroup?
    /// Problems worked around (a damaged second metadata area while the first is good).
    package let warnings: [String]

    static let labelMagic: [UInt8] = Array("LABELONE".utf8)
    static let labelType: [UInt8] = Array("LVM2 001".utf8)
    static let mdaMagic: [UInt8] = Array(" LVM2 x[5A%r0N*>".utf8)
    static let sectorSize: UInt64 = 512
    static let labelScanSectors: UInt64 = 4
    static let mdaHeaderSize: UInt64 = 512
    /// Longest area list followed in the PV header (the 512-byte sector holds at most 29).
    static let maxAreas = 32
    static let rawLocationIgnored: UInt32 = 1
    static let uuidCharacters = Set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#".utf8)

    /// An LVM2 label ("LABELONE" at the start of one of sectors 0-3, naming that sector, with
    /// type "LVM2 001"). Never throws; false on anything short or odd.
    package static func probe(_ source: any BlockSource) -> Bool {
        guard source.size >= labelScanSectors * sectorSize,
              let head = try? source.readBytes(at: 0, count: Int(labelScanSectors * sectorSize)) else { return false }
        let b = CheckedBytes(head)
        for s in 0..<Int(labelScanSectors) {
            let o = s * Int(sectorSize)
            if b.slice(at: o, count: 8)?.elementsEqual(labelMagic) == true, b.u64(at: o + 8) == UInt64(s),
               b.slice(at: o + 24, count: 8)?.elementsEqual(labelType) == true {
                return true
            }
        }
        return false
    }

    package init(source: any BlockSource) throws {
        self.source = source
        let name = source.name
        guard source.size >= Self.labelScanSectors * Self.sectorSize else {
            throw CairnError(.malformedImage, "LVM PV: the volume (\(source.size) bytes) is too small to hold a label", path: name, offset: 0)
        }
        let head = CheckedBytes(try source.readBytes(at: 0, count: Int(Self.labelScanSectors * Self.sectorSize)))

        // The label: the first sector of 0-3 with the magic naming itself.
        var found: Int?
        var crcProblem: CairnError?
        for s in 0..<Int(Self.labelScanSectors) {
            let o = s * Int(Self.sectorSize)
            guard head.slice(at: o, count: 8)?.elementsEqual(Self.labelMagic) == true, head.u64(at: o + 8) == UInt64(s) else { continue }
            let stored = head.u32(at: o + 16) ?? 0
            let computed = LVMChecksum.enforced ? LVMChecksum.checksum(head.slice(at: o + 20, count: 492) ?? []) : stored
            if computed != stored {
                crcProblem = crcProblem ?? CairnError(.malformedImage, "LVM label in sector \(s): checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))",
                                                      path: name, offset: UInt64(o + 16),
                                                      hint: "the PV label is damaged; `pvck --repair` on a restored copy may fix it")
                continue
            }
            found = s
            break
        }
        guard let sector = found else {
            throw crcProblem ?? CairnError(.malformedImage, "no LVM label (\"LABELONE\") in sectors 0-3", path: name, offset: 0)
        }
        let lo = sector * Int(Self.sectorSize)
        labelSector = UInt64(sector)
        guard head.slice(at: lo + 24, count: 8)?.elementsEqual(Self.labelType) == true else {
            let t = String(decoding: head.slice(at: lo + 24, count: 8) ?? [], as: UTF8.self)
            throw CairnError(.unsupported, "LVM label type \"\(t)\" is not supported (only \"LVM2 001\")", path: name, offset: UInt64(lo + 24))
        }

        // The PV header, inside the label sector.
        let label = CheckedBytes(Array(head.slice(at: lo, count: Int(Self.sectorSize)) ?? []))
        let headerOffset = Int(label.u32(at: 20) ?? 0)
        guard headerOffset >= 32, headerOffset <= Int(Self.sectorSize) - 40 else {
            throw CairnError(.malformedImage, "LVM label: PV header offset \(headerOffset) is outside 32...472", path: name, offset: UInt64(lo + 20))
        }
        guard let uuidBytes = label.slice(at: headerOffset, count: 32), let devSize = label.u64(at: headerOffset + 32) else {
            throw CairnError(.malformedImage, "LVM PV header is truncated", path: name, offset: UInt64(lo + headerOffset))
        }
        guard uuidBytes.allSatisfy({ Self.uuidCharacters.contains($0) }) else {
            throw CairnError(.malformedImage, "LVM PV header: the UUID holds characters LVM never writes", path: name, offset: UInt64(lo + headerOffset))
        }
        uuid = LVMVolumeGroup.dashedUUID(String(decoding: uuidBytes, as: UTF8.self))
        deviceSize = devSize

        // Two NUL-terminated lists (data areas, metadata areas), then the extension.
        var pos = headerOffset + 40
        func areaList(_ what: String) throws -> [LVMDiskArea] {
            var out: [LVMDiskArea] = []
            while true {
                guard let off = label.u64(at: pos), let size = label.u64(at: pos + 8) else {
                    throw CairnError(.malformedImage, "LVM PV header: the \(what) list runs past the end of the label sector",
                                     path: name, offset: UInt64(lo + pos))
                }
                pos += 16
                if off == 0 { return out }
                guard out.count < Self.maxAreas else {
                    throw CairnError(.malformedImage, "LVM PV header: more than \(Self.maxAreas) \(what)s", path: name, offset: UInt64(lo + pos))
                }
                out.append(LVMDiskArea(offset: off, size: size))
            }
        }
        dataAreas = try areaList("data area")
        let mdaList = try areaList("metadata area")
        var bootloader: [LVMDiskArea] = []
        var extVersion: UInt32 = 0
        var extFlags: UInt32 = 0
        if let v = label.u32(at: pos), let f = label.u32(at: pos + 4), v != 0 {
            extVersion = v
            extFlags = f
            pos += 8
            // Bootloader areas are a version-1 feature; a damaged list only loses protection
            // of the area, which lies before pe_start anyway.
            bootloader = (try? areaList("bootloader area")) ?? []
        }
        bootloaderAreas = bootloader
        extensionVersion = extVersion
        extensionFlags = extFlags

        for d in dataAreas where d.offset > source.size {
            throw CairnError(.malformedImage, "LVM PV header: data area at byte \(d.offset) lies past the end of the volume (\(source.size) bytes)",
                             path: name, offset: UInt64(lo + headerOffset + 40))
        }

        // Metadata areas: read every one; keep the text with the highest seqno.
        var areas: [LVMMetadataArea] = []
        var best: (text: [UInt8], vg: LVMVolumeGroup)?
        var firstError: CairnError?
        var warnings: [String] = []
        for (i, a) in mdaList.enumerated() {
            do {
                let (mda, text) = try Self.readArea(a, index: i, source: source)
                areas.append(mda)
                guard let text, let start = mda.textOffset else { continue }
                let vg = try LVMVolumeGroup(text: text, source: name, offset: a.offset &+ start)
                if best == nil || vg.seqno > best?.vg.seqno ?? 0 { best = (text, vg) }
            } catch let e as CairnError {
                firstError = firstError ?? e
                warnings.append("metadata area \(i + 1): \(e.message)")
            }
        }
        if best == nil, let firstError { throw firstError }
        if let best, best.vg.physicalVolume(uuid: uuid) == nil {
            throw CairnError(.malformedImage, "LVM PV \(uuid): its metadata (volume group \"\(best.vg.name)\") does not list this PV",
                             path: name, offset: mdaList.first?.offset)
        }
        metadataAreaLocations = mdaList
        metadataAreas = areas
        metadataText = best?.text
        volumeGroup = best?.vg
        self.warnings = best == nil ? [] : warnings
    }

    /// Reads and checks one metadata area header and, when it records one, the current text.
    static func readArea(_ a: LVMDiskArea, index: Int, source: any BlockSource) throws -> (LVMMetadataArea, [UInt8]?) {
        let name = source.name
        let what = "LVM metadata area \(index + 1)"
        guard a.size >= mdaHeaderSize, a.offset <= source.size, a.size <= source.size - a.offset else {
            throw CairnError(.malformedImage, "\(what) (\(a.size) bytes at byte \(a.offset)) does not fit in the volume (\(source.size) bytes)",
                             path: name, offset: a.offset)
        }
        let raw = try source.readBytes(at: a.offset, count: Int(mdaHeaderSize))
        let h = CheckedBytes(raw)
        let stored = h.u32(at: 0) ?? 0
        let computed = LVMChecksum.enforced ? LVMChecksum.checksum(raw[4...]) : stored
        guard computed == stored else {
            throw CairnError(.malformedImage, "\(what) header: checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))",
                             path: name, offset: a.offset, hint: "the metadata area is damaged; `pvck --repair` on a restored copy may fix it")
        }
        guard h.slice(at: 4, count: 16)?.elementsEqual(mdaMagic) == true else {
            throw CairnError(.malformedImage, "\(what) header: magic \" LVM2 x[5A%r0N*>\" missing", path: name, offset: a.offset + 4)
        }
        let version = h.u32(at: 20) ?? 0
        guard version == 1 else {
            throw CairnError(.unsupported, "\(what) header version \(version) is not supported (only 1)", path: name, offset: a.offset + 20)
        }
        let start = h.u64(at: 24) ?? 0
        let size = h.u64(at: 32) ?? 0
        guard start == a.offset else {
            throw CairnError(.malformedImage, "\(what) header: start \(start) is not the area's offset \(a.offset)", path: name, offset: a.offset + 24)
        }
        guard size > mdaHeaderSize, size <= source.size - a.offset else {
            throw CairnError(.malformedImage, "\(what) header: size \(size) is not between \(mdaHeaderSize) and the end of the volume",
                             path: name, offset: a.offset + 32)
        }
        var mda = LVMMetadataArea(area: a, headerSize: size, textOffset: nil, textSize: 0, textChecksum: 0, ignored: false)
        // The first raw location is the committed text; the list ends at an offset of 0.
        guard let off = h.u64(at: 40), let len = h.u64(at: 48), let crc = h.u32(at: 56), let flags = h.u32(at: 60), off != 0 else {
            return (mda, nil)
        }
        mda.ignored = flags & rawLocationIgnored != 0
        guard !mda.ignored else { return (mda, nil) }
        let rlo = a.offset + 40
        guard off >= mdaHeaderSize, off < size else {
            throw CairnError(.malformedImage, "\(what): metadata text offset \(off) lies outside the area's buffer (\(mdaHeaderSize)..<\(size))",
                             path: name, offset: rlo)
        }
        guard len > 0, len <= size - mdaHeaderSize, len <= UInt64(LVMConfigText.maxBytes) else {
            throw CairnError(.malformedImage, "\(what): metadata text size \(len) does not fit the area's \(size - mdaHeaderSize)-byte buffer",
                             path: name, offset: rlo + 8)
        }
        // The text may wrap from the end of the area back to just after the header.
        let first = min(len, size - off)
        var text = try source.readBytes(at: a.offset + off, count: Int(first))
        if first < len {
            text += try source.readBytes(at: a.offset + mdaHeaderSize, count: Int(len - first))
        }
        let textCRC = LVMChecksum.enforced ? LVMChecksum.checksum(text) : crc
        guard textCRC == crc else {
            throw CairnError(.malformedImage, "\(what): metadata text checksum mismatch (stored 0x\(String(crc, radix: 16)), computed 0x\(String(textCRC, radix: 16)))",
                             path: name, offset: a.offset + off,
                             hint: "the volume group metadata is damaged; `vgcfgrestore` from a backup on a restored copy may fix it")
        }
        mda.textOffset = off
        mda.textSize = len
        mda.textChecksum = crc
        if let nul = text.firstIndex(of: 0) { text.removeSubrange(nul...) }
        return (mda, text)
    }

    /// Where physical extent 0 starts: `pe_start` from the metadata, else the first data area.
    package var peStart: UInt64? {
        volumeGroup?.physicalVolume(uuid: uuid)?.peStart ?? dataAreas.first?.offset
    }

    /// Byte ranges of this PV in physical extents no logical volume uses, ascending and
    /// merged, by the PV's own copy of the metadata; empty when it has none.
    package func unusedRanges() -> [Range<UInt64>] {
        guard let vg = volumeGroup else { return [] }
        return unusedRanges(in: vg)
    }

    /// Byte ranges of this PV in physical extents that no segment of `vg` uses. Never the
    /// label, a metadata or bootloader area, anything before pe_start or after the last
    /// extent, nor anything past the end of the volume. A PV referenced by a segment type
    /// whose extent use Cairn cannot size has no unused ranges.
    package func unusedRanges(in vg: LVMVolumeGroup) -> [Range<UInt64>] {
        guard let pv = vg.physicalVolume(uuid: uuid), !vg.opaquePVs.contains(pv.name) else { return [] }
        // Used extents as sorted, merged intervals.
        var used = (vg.usedAreas[pv.name] ?? []).map { a in a.startExtent..<(add(a.startExtent, a.extentCount) ?? UInt64.max) }
        used.sort { $0.lowerBound < $1.lowerBound }
        var free: [Range<UInt64>] = []
        var cursor: UInt64 = 0
        for r in used {
            if r.lowerBound > cursor { free.append(cursor..<min(r.lowerBound, pv.peCount)) }
            cursor = max(cursor, r.upperBound)
            if cursor >= pv.peCount { break }
        }
        if cursor < pv.peCount { free.append(cursor..<pv.peCount) }
        // Extents to bytes, clipped to the volume and to the device size the header records.
        let limit = deviceSize == 0 ? source.size : min(source.size, deviceSize)
        var bytes: [Range<UInt64>] = []
        for r in free where !r.isEmpty {
            guard let s0 = mul(r.lowerBound, vg.extentSize), let s = add(pv.peStart, s0), s < limit else { continue }
            let e = mul(r.upperBound, vg.extentSize).flatMap { add(pv.peStart, $0) } ?? UInt64.max
            bytes.append(s..<min(e, limit))
        }
        // Never hand out the label sectors or any area the header names, whatever pe_start says.
        var protected: [Range<UInt64>] = [0..<Self.labelScanSectors * Self.sectorSize]
        for a in metadataAreaLocations + bootloaderAreas {
            protected.append(a.offset..<(add(a.offset, a.size) ?? UInt64.max))
        }
        for p in protected where !p.isEmpty {
            var out: [Range<UInt64>] = []
            for r in bytes {
                if p.upperBound <= r.lowerBound || p.lowerBound >= r.upperBound {
                    out.append(r)
                    continue
                }
                if r.lowerBound < p.lowerBound { out.append(r.lowerBound..<p.lowerBound) }
                if p.upperBound < r.upperBound { out.append(p.upperBound..<r.upperBound) }
            }
            bytes = out
        }
        var merged: [Range<UInt64>] = []
        for r in bytes.sorted(by: { $0.lowerBound < $1.lowerBound }) where !r.isEmpty {
            if let last = merged.last, r.lowerBound <= last.upperBound {
                merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                merged.append(r)
            }
        }
        return merged
    }
}
