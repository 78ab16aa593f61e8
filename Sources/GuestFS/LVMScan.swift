import CairnCore

/// LVM2 inside a disk's layout: physical volumes found among the disk's volumes, their
/// volume groups, and each logical volume as a volume of its own ("VG/LV").
enum LVMScan {
    /// Classifies `source` if it carries an LVM2 label: a physical volume (named by its volume
    /// group), or damaged when the label is there but the PV cannot be read. Nil: no label.
    static func classify(_ source: any BlockSource, name: String, warnings: inout [String]) -> VolumeContent? {
        guard LVMPhysicalVolume.probe(source) else { return nil }
        do {
            let pv = try LVMPhysicalVolume(source: source)
            warnings += pv.warnings.map { "\(name): \($0)" }
            return .lvmPhysicalVolume(volumeGroup: pv.volumeGroup?.name ?? "(no volume group)")
        } catch {
            return .damaged(typeName: "LVM2 PV", reason: describe(error))
        }
    }

    /// The logical volumes of the volume groups whose physical volumes are `pvs` (the disk's
    /// volumes holding a PV, with their sources). A logical volume that needs a PV not on this
    /// disk, or of a kind not read (thin, RAID, cache, snapshot), is reported and skipped.
    static func logicalVolumes(of pvs: [(Volume, any BlockSource)], readers: [FileSystemReader], warnings: inout [String]) -> [Volume] {
        var parsed: [(volume: Volume, pv: LVMPhysicalVolume)] = []
        for (v, source) in pvs {
            if let pv = try? LVMPhysicalVolume(source: source) { parsed.append((v, pv)) }
        }
        let byUUID = Dictionary(parsed.map { ($0.pv.uuid, $0.volume) }, uniquingKeysWith: { a, _ in a })
        var out: [Volume] = []
        // One group per volume group UUID, from the newest metadata among its PVs.
        for assembled in LVMVolumeGroup.assemble(parsed.map(\.pv)).sorted(by: { $0.group.name < $1.group.name }) {
            let vg = assembled.group
            for m in assembled.missing {
                warnings.append("\(vg.name): physical volume \(m.name) (\(m.uuid)) is not on this disk; logical volumes using it are not read")
            }
            for lv in vg.logicalVolumes where lv.isVisible {
                let name = "\(vg.name)/\(lv.name)"
                if let reason = lv.unsupportedReason {
                    warnings.append("\(name): \(reason); not read")
                    continue
                }
                let source: LogicalVolumeSource
                do {
                    source = try assembled.logicalVolume(lv.name)
                } catch {
                    warnings.append("\(name): \(describe(error))")
                    continue
                }
                let toDisk: @Sendable (Range<UInt64>) -> [Range<UInt64>] = { r in
                    guard let pieces = source.physicalRanges(of: r) else { return [] }
                    var mapped: [Range<UInt64>] = []
                    for p in pieces {
                        guard let pvVolume = byUUID[p.pvUUID] else { return [] }
                        mapped += pvVolume.toDisk(p.range)
                    }
                    return mapped
                }
                let v = DiskLayout.classify(name: name, source: source, partition: nil, toDisk: toDisk, readers: readers,
                                            lookForLVM: false, warnings: &warnings)
                out.append(v)
            }
        }
        return out
    }

    /// Disk byte ranges of the physical extents no logical volume uses, on every PV of the
    /// disk (PVs without metadata of their own count through their assembled group).
    static func unusedDiskRanges(of pvs: [Volume]) -> [Range<UInt64>] {
        var parsed: [(volume: Volume, pv: LVMPhysicalVolume)] = []
        for v in pvs {
            if let pv = try? LVMPhysicalVolume(source: v.source) { parsed.append((v, pv)) }
        }
        var out: [Range<UInt64>] = []
        for assembled in LVMVolumeGroup.assemble(parsed.map(\.pv)) {
            for member in assembled.members {
                guard let v = parsed.first(where: { $0.pv.uuid == member.uuid })?.volume else { continue }
                out += assembled.unusedRanges(of: member).flatMap { v.toDisk($0) }
            }
        }
        return out
    }
}
