import CairnCore

/// LVM2 inside a disk's layout (filled in when the LVM reader lands).
enum LVMScan {
    static func volumeGroupName(_ source: any BlockSource) -> String? { nil }

    static func logicalVolumes(of pvs: [(Volume, any BlockSource)], readers: [FileSystemReader], warnings: inout [String]) -> [Volume] { [] }

    static func unusedDiskRanges(of volume: Volume) -> [Range<UInt64>] { [] }
}
