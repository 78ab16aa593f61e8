import CairnCore

/// A logical volume's bytes as a block source, mapped onto its physical volumes the way the
/// device-mapper "linear" and "striped" targets map them. Reads are split at segment and
/// stripe-chunk boundaries; every piece is one positional read of the PV source.
///
/// Logical byte `o` of a striped segment with `n` stripes of chunk size `c` lies in chunk
/// `k = o / c`, on stripe `k % n`, at byte `(k / n) * c + o % c` of that stripe's area;
/// a stripe's area starts at `pe_start + start_extent * extent_size` on its PV.
package struct LogicalVolumeSource: BlockSource {
    package let name: String
    package let size: UInt64
    package let logicalVolume: LVMLogicalVolume
    private let pieces: [Piece]
    private let sources: [any BlockSource]
    /// PV UUID (dashed) of each entry of `sources`.
    private let sourceUUIDs: [String]

    /// One segment, in bytes: where it starts in the LV, its length, and its stripes.
    private struct Piece: Sendable {
        var start: UInt64
        var length: UInt64
        /// 0 for a linear segment (one stripe).
        var chunk: UInt64
        /// Per stripe: index into `sources` and the byte offset of the stripe's area there.
        var stripes: [(source: Int, base: UInt64)]
    }

    /// Maps LV `logicalVolume` of `volumeGroup` onto the PVs in `physicalVolumes` (keyed by PV
    /// UUID, dashes optional: the whole-PV sources, i.e. the partitions or disks holding the
    /// labels). Throws `.unsupported` for an LV Cairn cannot map, `.notFound` for a missing PV
    /// or LV, `.malformedImage` when an extent lies past the end of its PV.
    package init(volumeGroup vg: LVMVolumeGroup, logicalVolume lvName: String, physicalVolumes: [String: any BlockSource]) throws {
        guard let lv = vg.logicalVolume(named: lvName) else {
            throw CairnError(.notFound, "volume group \"\(vg.name)\" has no logical volume \"\(lvName)\"")
        }
        let fullName = "\(vg.name)/\(lv.name)"
        if let reason = lv.unsupportedReason {
            throw CairnError(.unsupported, "logical volume \(fullName): \(reason)",
                             hint: "its blocks are backed up as part of the physical volumes instead")
        }
        var byUUID: [String: any BlockSource] = [:]
        for (k, v) in physicalVolumes { byUUID[LVMVolumeGroup.bareUUID(k)] = v }
        var sources: [any BlockSource] = []
        var uuids: [String] = []
        var sourceIndex: [String: Int] = [:]
        var pieces: [Piece] = []
        pieces.reserveCapacity(lv.segments.count)
        var entries: [String: LVMPhysicalVolumeEntry] = [:]
        for pv in vg.physicalVolumes where entries[pv.name] == nil { entries[pv.name] = pv }
        for (si, seg) in lv.segments.enumerated() {
            guard let start = mul(seg.startExtent, vg.extentSize), let length = mul(seg.extentCount, vg.extentSize),
                  seg.stripeCount >= 1, seg.stripes.count == seg.stripeCount else {
                throw CairnError(.malformedImage, "logical volume \(fullName) segment \(si + 1) is inconsistent")
            }
            let areaBytes = length / UInt64(seg.stripeCount)
            var stripes: [(source: Int, base: UInt64)] = []
            for (k, area) in seg.stripes.enumerated() {
                guard let pv = entries[area.pvName] else {
                    throw CairnError(.malformedImage, "logical volume \(fullName) segment \(si + 1) stripe \(k) names \"\(area.pvName)\", which is not a physical volume of the group")
                }
                let index: Int
                if let i = sourceIndex[pv.name] {
                    index = i
                } else {
                    guard let src = byUUID[LVMVolumeGroup.bareUUID(pv.uuid)] else {
                        throw CairnError(.notFound, "logical volume \(fullName) needs physical volume \(pv.name) (UUID \(pv.uuid), last seen as \(pv.device ?? "an unknown device")), which is not among the disks given",
                                         hint: "attach every disk of volume group \"\(vg.name)\" to the backup")
                    }
                    index = sources.count
                    sources.append(src)
                    uuids.append(pv.uuid)
                    sourceIndex[pv.name] = index
                }
                let src = sources[index]
                guard let off = mul(area.startExtent, vg.extentSize), let base = add(pv.peStart, off),
                      let end = add(base, areaBytes), end <= src.size else {
                    throw CairnError(.malformedImage, "logical volume \(fullName) segment \(si + 1) stripe \(k): extents \(area.startExtent)..<\(area.startExtent &+ area.extentCount) of \(pv.name) lie past the end of its volume (\(src.size) bytes)",
                                     path: src.name, offset: pv.peStart,
                                     hint: "the disk image is truncated or the metadata damaged")
                }
                stripes.append((index, base))
            }
            let chunk = seg.stripeCount == 1 ? 0 : seg.stripeSize
            guard seg.stripeCount == 1 || (chunk > 0 && areaBytes % chunk == 0) else {
                throw CairnError(.malformedImage, "logical volume \(fullName) segment \(si + 1): stripe size \(chunk) does not divide the stripe length \(areaBytes)")
            }
            pieces.append(Piece(start: start, length: length, chunk: chunk, stripes: stripes))
        }
        self.name = fullName
        self.size = lv.size
        self.logicalVolume = lv
        self.pieces = pieces
        self.sources = sources
        self.sourceUUIDs = uuids
    }

    /// Same, with the PVs as parsed (each maps its UUID to its source).
    package init(volumeGroup: LVMVolumeGroup, logicalVolume: String, physicalVolumes: [LVMPhysicalVolume]) throws {
        var map: [String: any BlockSource] = [:]
        for pv in physicalVolumes { map[pv.uuid] = pv.source }
        try self.init(volumeGroup: volumeGroup, logicalVolume: logicalVolume, physicalVolumes: map)
    }

    /// The segment holding logical byte `offset` (binary search; pieces tile the LV).
    private func pieceIndex(_ offset: UInt64) -> Int? {
        var lo = 0, hi = pieces.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if pieces[mid].start + pieces[mid].length <= offset { lo = mid + 1 } else { hi = mid }
        }
        return lo < pieces.count && pieces[lo].start <= offset ? lo : nil
    }

    /// Where logical byte `offset` lives and how many bytes from there stay contiguous (up to
    /// `limit`): (source index, source offset, length).
    private func locate(_ offset: UInt64, limit: UInt64) -> (Int, UInt64, UInt64)? {
        guard let i = pieceIndex(offset) else { return nil }
        let p = pieces[i]
        let o = offset - p.start
        if p.chunk == 0 {
            let s = p.stripes[0]
            return (s.source, s.base + o, min(limit, p.length - o))
        }
        let k = o / p.chunk
        let n = UInt64(p.stripes.count)
        let s = p.stripes[Int(k % n)]
        let within = o % p.chunk
        return (s.source, s.base + (k / n) * p.chunk + within, min(limit, p.chunk - within))
    }

    /// Where the LV bytes `range` live: PV byte ranges in LV order (PV UUID, range on that
    /// PV's source), split at segment and stripe-chunk boundaries and merged where contiguous.
    /// Stops after `limit` pieces (nil then), so a huge striped range cannot allocate without bound.
    package func physicalRanges(of range: Range<UInt64>, limit: Int = 1 << 20) -> [(pvUUID: String, range: Range<UInt64>)]? {
        let end = min(range.upperBound, size)
        var out: [(pvUUID: String, range: Range<UInt64>)] = []
        var here = range.lowerBound
        while here < end {
            guard let (src, at, n) = locate(here, limit: end - here), n > 0 else { return nil }
            if let last = out.last, last.pvUUID == sourceUUIDs[src], last.range.upperBound == at {
                out[out.count - 1].range = last.range.lowerBound..<at + n
            } else {
                guard out.count < limit else { return nil }
                out.append((sourceUUIDs[src], at..<at + n))
            }
            here += n
        }
        return out
    }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        var done = 0
        while done < buffer.count {
            let here = offset + UInt64(done)
            guard let (src, at, n) = locate(here, limit: UInt64(buffer.count - done)), n > 0 else {
                throw CairnError(.malformedImage, "no segment maps byte \(here)", path: name, offset: here)
            }
            let count = Int(n)
            try sources[src].read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + count]), at: at)
            done += count
        }
    }

    /// Linear pieces report their PV's allocation map; striped pieces report data (asking each
    /// chunk would cost one call per stripe chunk).
    package func extents(in range: Range<UInt64>) throws -> [Extent] {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end else { return [] }
        var out: [Extent] = []
        var here = range.lowerBound
        while here < end {
            guard let i = pieceIndex(here) else {
                throw CairnError(.malformedImage, "no segment maps byte \(here)", path: name, offset: here)
            }
            let p = pieces[i]
            let stop = min(end, p.start + p.length)
            if p.chunk == 0 {
                let s = p.stripes[0]
                let base = s.base + (here - p.start)
                let length = stop - here
                for e in try sources[s.source].extents(in: base..<base + length) {
                    let a = max(e.offset, base), b = min(e.end, base + length)
                    guard a < b else { continue }
                    out.append(Extent(offset: here + (a - base), length: b - a, kind: e.kind))
                }
            } else {
                out.append(Extent(offset: here, length: stop - here, kind: .data))
            }
            here = stop
        }
        return out.coalesced()
    }

    package func prefetch(_ range: Range<UInt64>) {
        let end = min(range.upperBound, size)
        guard range.lowerBound < end, let (src, at, n) = locate(range.lowerBound, limit: end - range.lowerBound) else { return }
        sources[src].prefetch(at..<at + n)
    }
}
