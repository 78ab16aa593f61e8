import CairnCore
import GuestFS
import RepositoryFormat
import Repository

/// Where a path given to `ls`, `cat`, `restore-files` or `diff` points inside a disk:
/// above the volumes (the list of partitions / volume groups) or into one volume's file system.
package enum GuestLocation {
    /// A listing of volumes whose names start with `prefix` ("" = all, "vg0" = its LVs).
    case volumes(prefix: String)
    /// `path` (absolute) inside `volume`.
    case inVolume(Volume, path: String)
}

/// One snapshot disk opened for file-level access: read from the repository, partitions,
/// volume groups and file systems found. Paths are `/VOLUME/path/in/fs` ("/p1/etc/hosts",
/// "/vg0/root/etc/hosts"); a disk that is one file system without a partition table is
/// addressed without the volume part ("/etc/hosts").
package struct GuestView: Sendable {
    package let snapshot: SnapshotEntry
    package let disk: Manifest.Disk
    package let source: SnapshotDiskSource
    package let layout: DiskLayout

    package init(repository: Repository, snapshot: SnapshotEntry, disk: Manifest.Disk) throws {
        self.snapshot = snapshot
        self.disk = disk
        self.source = try SnapshotDiskSource(repository: repository, snapshot: snapshot, disk: disk)
        self.layout = DiskLayout.scan(source)
    }

    /// The disk of `snapshot` named `name`, or its only disk.
    package static func chooseDisk(_ snapshot: SnapshotEntry, name: String?) throws -> Manifest.Disk {
        let disks = snapshot.manifest.disks
        if let name {
            guard let d = disks.first(where: { $0.name == name }) else {
                throw CairnError(.notFound, "snapshot \(snapshot.id.short) has no disk '\(name)' (it has: \(disks.map(\.name).joined(separator: ", ")))")
            }
            return d
        }
        guard disks.count == 1 else {
            throw CairnError(.usage, "snapshot \(snapshot.id.short) has \(disks.count) disks; name one as SNAPSHOT:DISK (\(disks.map(\.name).joined(separator: ", ")))")
        }
        return disks[0]
    }

    /// Whether the disk is a single file system addressed without a volume name.
    package var isBareFileSystem: Bool {
        layout.volumes.count == 1 && layout.volumes[0].name.isEmpty
    }

    package func locate(_ path: String) throws -> GuestLocation {
        let parts = path.split(separator: "/").map(String.init).filter { $0 != "." }
        if isBareFileSystem { return .inVolume(layout.volumes[0], path: "/" + parts.joined(separator: "/")) }
        if parts.isEmpty { return .volumes(prefix: "") }
        for k in stride(from: parts.count, through: 1, by: -1) {
            let name = parts[0..<k].joined(separator: "/")
            if let v = layout.volume(named: name) {
                return .inVolume(v, path: "/" + parts[k...].joined(separator: "/"))
            }
        }
        let prefix = parts.joined(separator: "/")
        if layout.volumes.contains(where: { $0.name.hasPrefix(prefix + "/") }) { return .volumes(prefix: prefix) }
        let names = layout.volumes.map { $0.name.isEmpty ? "(whole disk)" : $0.name }
        throw CairnError(.notFound, "no volume '\(parts[0])' on disk \(disk.name) of snapshot \(snapshot.id.short) (volumes: \(names.joined(separator: ", ")))")
    }

    /// The file system of `volume`, or a clear error saying what the volume holds instead.
    package static func fileSystem(of volume: Volume) throws -> any FileSystem {
        switch volume.content {
        case .fileSystem(let fs): return fs
        case .damaged(let type, let reason):
            throw CairnError(.malformedImage, "volume \(volume.name) holds a damaged \(type) file system: \(reason)",
                             hint: "restore the whole disk and run the file system's checker on the copy")
        case .swap: throw CairnError(.unsupported, "volume \(volume.name) is swap space, not a file system")
        case .lvmPhysicalVolume(let vg): throw CairnError(.unsupported, "volume \(volume.name) is an LVM physical volume of \(vg); its logical volumes are listed as /\(vg)/LV")
        case .unrecognized: throw CairnError(.unsupported, "volume \(volume.name) holds no file system Cairn recognises (ext2/3/4, XFS, NTFS, FAT)")
        }
    }
}

/// File catalogs stored with snapshots (docs/FORMAT.md, "File catalog").
package enum CatalogStore {
    /// Largest catalog read back (bytes of text).
    package static let maxBytes: UInt64 = 4 << 30

    package static func load(repository: Repository, snapshot: SnapshotEntry, disk: Manifest.Disk) throws -> FileCatalog? {
        guard let hex = disk.catalog else { return nil }
        guard let id = CairnCore.Digest(hex: hex) else {
            throw CairnError(.corrupt, "snapshot \(snapshot.id.short) disk \(disk.name) names an invalid catalog id '\(hex)'")
        }
        let codec = repository.makeCodec()
        let index = try repository.loadIndex(id, codec: codec)
        guard index.virtualSize <= maxBytes else {
            throw CairnError(.corrupt, "catalog \(hex) of snapshot \(snapshot.id.short) claims \(index.virtualSize) bytes")
        }
        var bytes = [UInt8](repeating: 0, count: Int(index.virtualSize))
        var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: index.chunkSize + 4096, alignment: 64)
        defer { scratch.deallocate() }
        try bytes.withUnsafeMutableBytes { out in
            for (i, entry) in index.entries.enumerated() where !entry.isZero {
                let start = i * index.chunkSize
                let len = index.length(ofChunk: i)
                let n = try repository.loadChunk(entry, codec: codec, scratch: &scratch,
                                                 into: UnsafeMutableRawBufferPointer(rebasing: out[start..<start + len]))
                guard n == len else { throw CairnError(.corrupt, "catalog chunk \(entry.hex) holds \(n) bytes, not \(len)") }
            }
        }
        return try FileCatalog.decode(bytes, what: "catalog \(hex) of snapshot \(snapshot.id.short) disk \(disk.name)")
    }
}
