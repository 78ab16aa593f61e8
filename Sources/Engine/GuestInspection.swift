import CairnCore
import GuestFS
import RepositoryFormat

/// What a backup learns from a disk's guest file systems before reading it: the ranges the
/// guest marks free (treated as zero: never read, never stored), the layout its file catalog
/// is walked from (`walkCatalog`, beside the data pipeline), and a one-line summary per volume
/// for the manifest. Nothing here can fail the backup: a file
/// system Cairn cannot read is backed up block for block, with a warning.
package struct GuestInspection: Sendable {
    package var freeRanges: [Range<UInt64>]
    package var volumes: [String]
    package var warnings: [String]
    /// The partition table and volumes found (nil when the guest was not looked at).
    package var layout: DiskLayout?

    /// At most this many files are catalogued per disk (the rest are left out with a warning).
    package static let maxCatalogEntries = 20_000_000

    package static func inspect(_ disk: any BlockSource, diskName: String, freeSpace: Bool,
                                readers: [FileSystemReader] = FileSystemReader.all) -> GuestInspection {
        let layout = DiskLayout.scan(disk, readers: readers)
        var warnings = layout.warnings.map { "disk \(diskName): \($0)" }
        var summary: [String] = []
        for v in layout.volumes {
            var line = v.name.isEmpty ? "disk" : v.name
            line += " " + v.content.summary
            if let fs = v.fileSystem, !fs.label.isEmpty { line += " \"\(fs.label)\"" }
            summary.append(line)
        }
        var free: [Range<UInt64>] = []
        if freeSpace {
            var w: [String] = []
            free = layout.freeDiskRanges(warnings: &w)
            warnings += w.map { "disk \(diskName): \($0)" }
        }
        return GuestInspection(freeRanges: free, volumes: summary, warnings: warnings, layout: layout)
    }

    /// The file catalog of every file system in `layout` (nil when there is none). It reads
    /// only file system metadata, so a backup runs it beside the data pipeline.
    package static func walkCatalog(_ layout: DiskLayout, diskName: String) -> (catalog: FileCatalog?, warnings: [String]) {
        guard layout.volumes.contains(where: { $0.fileSystem != nil }) else { return (nil, []) }
        var warnings: [String] = []
        var c = FileCatalog()
        for v in layout.volumes {
            guard let fs = v.fileSystem else { continue }
            let number = c.volumes.count
            c.volumes.append(.init(name: v.name, type: fs.typeName, label: fs.label, uuid: fs.uuid ?? ""))
            do {
                try fs.walk(maxEntries: maxCatalogEntries) { path, _, meta in
                    c.entries.append(FileCatalog.Entry(
                        volume: number, kind: meta.kind.letter, permissions: meta.permissions & 0o7777, uid: meta.uid, gid: meta.gid,
                        size: meta.size, mtimeSeconds: meta.modified.seconds, mtimeNanoseconds: min(meta.modified.nanoseconds, 999_999_999),
                        path: path))
                }
            } catch {
                warnings.append("disk \(diskName): \(v.name.isEmpty ? "" : v.name + ": ")the \(fs.typeName) tree could not be walked to the end (\(describe(error))); the catalog lists what was read")
            }
        }
        return (c, warnings)
    }
}
