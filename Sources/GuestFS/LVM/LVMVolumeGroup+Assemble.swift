import CairnCore

/// A volume group found on a set of physical volumes, with the PVs that belong to it.
package struct LVMAssembledGroup: Sendable {
    /// The metadata with the highest seqno among the members' copies.
    package var group: LVMVolumeGroup
    /// The given PVs the group lists, in the group's PV order.
    package var members: [LVMPhysicalVolume]
    /// PVs the group lists that were not among those given (their LVs cannot be opened).
    package var missing: [LVMPhysicalVolumeEntry]

    /// The block source of logical volume `name` over the members.
    package func logicalVolume(_ name: String) throws -> LogicalVolumeSource {
        try LogicalVolumeSource(volumeGroup: group, logicalVolume: name, physicalVolumes: members)
    }

    /// The unused ranges of `member` (one of `members`) by the group's metadata.
    package func unusedRanges(of member: LVMPhysicalVolume) -> [Range<UInt64>] {
        member.unusedRanges(in: group)
    }
}

extension LVMVolumeGroup {
    /// Groups parsed PVs into volume groups: per VG UUID the copy of the metadata with the
    /// highest seqno wins; every PV whose UUID that metadata lists joins it, including PVs
    /// that carry no metadata of their own (`--metadatacopies 0`). PVs no group lists (orphans)
    /// are left out; of two PVs with the same UUID (a cloned disk) the first is used. Groups
    /// come in the order their first PV was given.
    package static func assemble(_ pvs: [LVMPhysicalVolume]) -> [LVMAssembledGroup] {
        var order: [String] = []
        var best: [String: LVMVolumeGroup] = [:]
        for pv in pvs {
            guard let vg = pv.volumeGroup else { continue }
            if let have = best[vg.uuid] {
                if vg.seqno > have.seqno { best[vg.uuid] = vg }
            } else {
                best[vg.uuid] = vg
                order.append(vg.uuid)
            }
        }
        var byUUID: [String: LVMPhysicalVolume] = [:]
        for pv in pvs {
            let key = bareUUID(pv.uuid)
            if byUUID[key] == nil { byUUID[key] = pv }
        }
        var claimed: Set<String> = []
        var out: [LVMAssembledGroup] = []
        for id in order {
            guard let vg = best[id] else { continue }
            var members: [LVMPhysicalVolume] = []
            var missing: [LVMPhysicalVolumeEntry] = []
            for entry in vg.physicalVolumes {
                let key = bareUUID(entry.uuid)
                if let pv = byUUID[key], !claimed.contains(key) {
                    claimed.insert(key)
                    members.append(pv)
                } else {
                    missing.append(entry)
                }
            }
            out.append(LVMAssembledGroup(group: vg, members: members, missing: missing))
        }
        return out
    }
}
