import CairnCore
import Foundation
import Repository
import RepositoryFormat
import Storage

/// What `cairn gc` found and removed.
package struct GCReport: Sendable, Codable {
    package var dryRun: Bool
    package var snapshots: Int
    package var referencedChunks: Int
    package var storedChunks: Int
    package var deletedChunks: Int
    package var deletedBytes: UInt64
    package var referencedIndexes: Int
    package var deletedIndexes: Int
    /// Snapshots written while the mark ran, read again in the sweep.
    package var snapshotsAddedDuringMark: Int
    /// Verification records of snapshots that no longer exist.
    package var deletedVerifications: Int
}

/// Garbage collection (docs/FORMAT.md, "Garbage collection"): removes chunks and indexes that
/// no snapshot references.
///
/// 1. Mark, under a shared lock (backups keep running): read every manifest and its indexes,
///    collect the referenced chunk and index ids, remember the manifest names seen.
/// 2. Sweep, under an exclusive lock (nothing else runs): read the manifests that appeared
///    since the mark listed them, add their references, then delete every chunk and index not
///    referenced.
///
/// A backup that finished during the mark is seen in step 2; one still running holds its
/// shared lock, so the sweep waits for it; one that starts later waits for the sweep. A
/// chunk stored by a backup that died is unreferenced and goes (the rerun stores it again).
/// A manifest that cannot be read stops the collection before anything is deleted: what it
/// references is unknown.
package final class GarbageCollector: @unchecked Sendable {
    package let repository: Repository
    package let dryRun: Bool
    package let cancel: CancellationToken

    package init(repository: Repository, dryRun: Bool = false, cancel: CancellationToken = CancellationToken()) {
        self.repository = repository; self.dryRun = dryRun; self.cancel = cancel
    }

    private struct Marks {
        var manifests: Set<String> = []
        var chunks: Set<CairnCore.Digest> = []
        var indexes: Set<String> = []
    }

    /// Adds the references of every manifest not yet in `marks`. Manifests deleted since the
    /// listing (a concurrent prune) are skipped; any other failure stops the collection.
    private func mark(_ marks: inout Marks, codec: ObjectCodec) throws -> Int {
        var added = 0
        for name in try repository.store.list("snapshots").sorted() where !marks.manifests.contains(name) {
            try cancel.check()
            guard let id = CairnCore.Digest(hex: name) else { continue }
            let manifest: Manifest
            do {
                manifest = try repository.loadManifest(id, codec: codec)
            } catch let e as CairnError where e.code == .notFound {
                continue
            } catch let e as CairnError {
                throw CairnError(.corrupt, "gc stopped before deleting anything: snapshot \(name) cannot be read (\(e.message))",
                                 path: e.path, hint: "run `cairn check`, then `cairn repair` to set the damaged snapshot aside")
            }
            marks.manifests.insert(name)
            added += 1
            for disk in manifest.disks {
              for (what, hex) in disk.indexReferences {   // the disk index and the file catalog
                guard let indexID = CairnCore.Digest(hex: hex) else {
                    throw CairnError(.corrupt, "gc stopped before deleting anything: snapshot \(name) disk \(disk.name) names an invalid \(what) id",
                                     hint: "run `cairn repair`")
                }
                if marks.indexes.contains(indexID.hex) { continue }
                let index: DiskIndex
                do {
                    index = try repository.loadIndex(indexID, codec: codec)
                } catch let e as CairnError {
                    throw CairnError(.corrupt, "gc stopped before deleting anything: \(what) \(indexID.hex) of snapshot \(name) disk \(disk.name) cannot be read (\(e.message))",
                                     path: e.path, hint: "run `cairn check`, then `cairn repair`")
                }
                marks.indexes.insert(indexID.hex)
                for entry in index.entries where !entry.isZero { marks.chunks.insert(entry) }
              }
            }
        }
        return added
    }

    package func run() throws -> GCReport {
        let codec = repository.makeCodec()
        var marks = Marks()
        do {
            let shared = try repository.lock(exclusive: false, job: "gc (mark)")
            defer { shared.release() }
            _ = try mark(&marks, codec: codec)
        }
        Trace.mark("gc: marked \(marks.chunks.count) chunks in \(marks.manifests.count) snapshots")
        let exclusive = try repository.lock(exclusive: true, job: dryRun ? "gc --dry-run (sweep)" : "gc (sweep)")
        defer { exclusive.release() }
        let late = try mark(&marks, codec: codec)

        let store = repository.store
        let storedChunks = try store.list("chunks")
        var deletedChunks = 0
        var deletedBytes: UInt64 = 0
        for name in storedChunks {
            try cancel.check()
            // A name that is not a chunk id is not ours to judge; leave it.
            guard let id = CairnCore.Digest(hex: name), !marks.chunks.contains(id) else { continue }
            let key = Repository.chunkKey(id)
            deletedBytes += (try? store.size(key)) .flatMap { $0 } ?? 0
            if !dryRun { try store.delete(key) }
            deletedChunks += 1
        }
        var deletedIndexes = 0
        for name in try store.list("indexes") where CairnCore.Digest(hex: name) != nil && !marks.indexes.contains(name) {
            try cancel.check()
            if !dryRun { try store.delete(ObjectKey("indexes", name)) }
            deletedIndexes += 1
        }
        // Verification records whose snapshot is gone (forgotten by an older cairn, or while
        // a verify was writing one).
        var deletedVerifications = 0
        for (name, snapshot) in try repository.verificationNames() where !marks.manifests.contains(snapshot.hex) {
            try cancel.check()
            if !dryRun { try store.delete(ObjectKey(Repository.verificationNamespace, name)) }
            deletedVerifications += 1
        }
        if !dryRun { try store.barrier() }
        return GCReport(dryRun: dryRun, snapshots: marks.manifests.count, referencedChunks: marks.chunks.count,
                        storedChunks: storedChunks.count, deletedChunks: deletedChunks, deletedBytes: deletedBytes,
                        referencedIndexes: marks.indexes.count, deletedIndexes: deletedIndexes, snapshotsAddedDuringMark: late,
                        deletedVerifications: deletedVerifications)
    }
}
