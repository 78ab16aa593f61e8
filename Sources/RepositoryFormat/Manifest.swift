import CairnCore
import Foundation

/// A snapshot manifest (docs/FORMAT.md, "Snapshot manifest"): JSON inside an object of kind
/// `manifest`. The snapshot id is the object id of its plaintext.
package struct Manifest: Codable, Sendable, Equatable {
    package struct Disk: Codable, Sendable, Equatable {
        package var name: String
        package var virtualSize: UInt64
        package var sourceFormat: String
        package var sourcePath: String
        /// Hex id of the disk index object.
        package var index: String
        package var chunks: Int
        /// Bytes read from the source.
        package var bytesRead: UInt64
        /// Bytes of chunks stored new by this backup (before compression).
        package var bytesNew: UInt64
        /// Bytes of chunks already present in the repository.
        package var bytesDeduplicated: UInt64
        /// Bytes known zero or unallocated, never read or stored.
        package var bytesZero: UInt64
        /// Bytes of stored objects added (after compression and encryption).
        package var bytesStored: UInt64
        /// Hex id of the disk's file catalog: an index (same format as a disk index) over chunks
        /// that hold the catalog text (docs/FORMAT.md, "File catalog"). Absent when no file
        /// system was recognised or the snapshot predates catalogs.
        package var catalog: String?
        /// Whether blocks the guest file systems mark free were treated as zero. Absent in
        /// snapshots made before free-space skipping existed.
        package var skipFreeSpace: Bool?
        /// Bytes marked free by the guest (file systems, swap, unused LVM extents) and so neither
        /// read nor stored (counted in `bytesZero` too).
        package var bytesFree: UInt64?
        /// What the disk holds, one line per volume ("p1 ext4", "p2 swap", "vg0/root xfs").
        package var volumes: [String]?
        /// How the disk was read: `full` (every allocated block), `cbt` (only the blocks a QEMU
        /// dirty bitmap marks changed since the base snapshot; the rest reused from it) or
        /// `hash-scan` (every allocated block, compared by content with the base). Absent in
        /// image backups made before live backups existed (they are `full` or `hash-scan`).
        package var readMode: String?
        /// Why the disk was not read with change tracking, or what the CBT check found.
        package var readNote: String?
        /// The base snapshot (hex id) whose index unchanged chunks were taken from (cbt).
        package var base: String?
        /// Change tracking from this snapshot on: the QEMU dirty bitmap (on `cbtNode`) that
        /// records every write made after this snapshot's point in time, and its generation.
        package var cbtBitmap: String?
        package var cbtGeneration: Int?
        package var cbtNode: String?

        /// The index objects this disk refers to: its disk index and, when present, its catalog.
        package var indexReferences: [(what: String, hex: String)] {
            [("index", index)] + (catalog.map { [("catalog", $0)] } ?? [])
        }

        package init(name: String, virtualSize: UInt64, sourceFormat: String, sourcePath: String, index: String, chunks: Int,
                     bytesRead: UInt64, bytesNew: UInt64, bytesDeduplicated: UInt64, bytesZero: UInt64, bytesStored: UInt64,
                     catalog: String? = nil, skipFreeSpace: Bool? = nil, bytesFree: UInt64? = nil, volumes: [String]? = nil) {
            self.name = name; self.virtualSize = virtualSize; self.sourceFormat = sourceFormat; self.sourcePath = sourcePath
            self.index = index; self.chunks = chunks; self.bytesRead = bytesRead; self.bytesNew = bytesNew
            self.bytesDeduplicated = bytesDeduplicated; self.bytesZero = bytesZero; self.bytesStored = bytesStored
            self.catalog = catalog; self.skipFreeSpace = skipFreeSpace; self.bytesFree = bytesFree; self.volumes = volumes
        }
    }

    package var version: Int
    package var vm: String
    /// RFC 3339 UTC time of the backup's start.
    package var time: String
    package var host: String
    package var tags: [String]
    package var toolVersion: String
    package var chunkSize: Int
    package var consistency: String
    package var disks: [Disk]
    /// Live backups: where the VM was read from (`qmp:PATH`).
    package var source: String?
    /// Live backups: the VM's configuration as QEMU described it (JSON text: command line,
    /// machine, CPUs, memory, disks), so an equivalent VM can be started later.
    package var vmConfig: String?

    package init(vm: String, time: String, host: String, tags: [String], toolVersion: String, chunkSize: Int, consistency: String = "crash", disks: [Disk]) {
        self.version = 1
        self.vm = vm; self.time = time; self.host = host; self.tags = tags; self.toolVersion = toolVersion
        self.chunkSize = chunkSize; self.consistency = consistency; self.disks = disks
    }

    package func encode() throws -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return [UInt8](try e.encode(self))
    }

    package static func decode(_ bytes: [UInt8], what: String) throws -> Manifest {
        let m: Manifest
        do {
            m = try JSONDecoder().decode(Manifest.self, from: Data(bytes))
        } catch {
            throw CairnError(.corrupt, "\(what): manifest is not valid JSON of the expected shape (\(error))")
        }
        guard m.version == 1 else { throw CairnError(.unsupported, "\(what): manifest version \(m.version) is not supported") }
        return m
    }
}
