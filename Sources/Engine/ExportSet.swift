import CairnCore
import Foundation
import NBDServer
import Repository
#if canImport(Glibc)
import Glibc
#endif

/// The NBD exports of one or more snapshots: every disk, read from the repository, optionally
/// writable through a copy-on-write overlay (docs/OVERLAY.md). Used by `cairn serve`,
/// `cairn instant-restore` and the boot sandbox.
package struct ExportSet {
    /// One exported disk.
    package struct Entry {
        /// Export name, `<short snapshot id>-<disk>`.
        package var name: String
        package var snapshot: SnapshotEntry
        package var disk: String
        package var size: UInt64
        /// Path of the overlay file (writable exports only).
        package var overlay: String?
    }

    package var exports: [NBDExport] = []
    package var overlays: [CopyOnWriteOverlay] = []
    package var descriptions: [Entry] = []

    package init() {}

    /// Export names are `<short snapshot id>-<disk>`. A writable export reuses the overlay file
    /// already in `overlayDirectory` for the same snapshot and disk, or creates one.
    package static func make(repository: Repository, snapshots: [SnapshotEntry], writable: Bool, overlayDirectory: String?) throws -> ExportSet {
        var set = ExportSet()
        do {
            for snap in snapshots {
                for disk in snap.manifest.disks {
                    let name = "\(snap.id.short)-\(disk.name)"
                    let source = try SnapshotDiskSource(repository: repository, snapshot: snap, disk: disk, cacheChunks: 128)
                    var overlayPath: String?
                    var device: CopyOnWriteOverlay?
                    if writable {
                        guard let dir = overlayDirectory else { throw CairnError(.usage, "writable exports need an overlay directory") }
                        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                        let path = (dir as NSString).appendingPathComponent("\(name.replacingOccurrences(of: "/", with: "_")).overlay")
                        let identity = "\(snap.id.hex):\(disk.name)"
                        device = FileManager.default.fileExists(atPath: path)
                            ? try CopyOnWriteOverlay.open(path: path, base: source, identity: identity)
                            : try CopyOnWriteOverlay.create(path: path, base: source, identity: identity)
                        overlayPath = path
                    }
                    if let device { set.overlays.append(device) }
                    set.exports.append(NBDExport(name: name, description: "\(snap.manifest.vm) \(snap.manifest.time) disk \(disk.name)",
                                                 source: source, writable: device))
                    set.descriptions.append(Entry(name: name, snapshot: snap, disk: disk.name, size: disk.virtualSize, overlay: overlayPath))
                }
            }
        } catch {
            set.closeOverlays()
            throw error
        }
        return set
    }

    /// Flushes and closes every overlay; returns a warning for each that could not be flushed.
    @discardableResult
    package func closeOverlays() -> [String] {
        var warnings: [String] = []
        for o in overlays {
            do { try o.close() } catch { warnings.append("overlay \(o.path) could not be flushed: \(error)") }
        }
        return warnings
    }

    /// Deletes the overlay files (after `closeOverlays`).
    package func removeOverlays() {
        for d in descriptions { if let p = d.overlay { unlink(p) } }
    }
}
