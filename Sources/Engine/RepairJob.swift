import CairnCore
import Foundation
import Repository
import RepositoryFormat
import Storage

/// What `cairn repair` did (or would do, with `dryRun`).
package struct RepairReport: Sendable, Codable {
    package var dryRun: Bool
    package var check: CheckReport
    /// Objects moved to `quarantine/` ("chunks/<id>", "indexes/<id>", "snapshots/<id>").
    package var quarantined: [String]
    /// Snapshots marked damaged (kept, listed as damaged, never used as a base).
    package var markedDamaged: [String]
    /// Snapshots forgotten (`forgetDamaged`).
    package var forgotten: [String]
    /// Snapshots whose damaged mark was cleared because everything they reference is back.
    package var healed: [String]
    /// Objects the storage failed to deliver: left in place (they may be intact); run repair
    /// again when the storage is healthy.
    package var unreadable: [String]
}

/// Repairs what `check --read-data` finds (docs/FORMAT.md, "Repair"), under an exclusive lock:
///
/// - corrupt chunks, indexes and manifests are moved to `quarantine/<namespace>/<name>` (so a
///   later backup can store a good copy under the same id, and nothing is destroyed);
/// - every snapshot that lost data is marked damaged (`damaged/<id>`, listing what is missing)
///   or, with `forgetDamaged`, forgotten;
/// - a damaged mark whose snapshot is complete again (a later backup stored the missing chunks
///   again) is cleared.
package final class RepairJob: @unchecked Sendable {
    package let repository: Repository
    package let dryRun: Bool
    package let forgetDamaged: Bool
    package let progress: any ProgressReporter
    package let cancel: CancellationToken

    package init(repository: Repository, dryRun: Bool = false, forgetDamaged: Bool = false,
                 progress: any ProgressReporter = SilentProgress(), cancel: CancellationToken = CancellationToken()) {
        self.repository = repository; self.dryRun = dryRun; self.forgetDamaged = forgetDamaged
        self.progress = progress; self.cancel = cancel
    }

    package func run() throws -> RepairReport {
        let lock = try repository.lock(exclusive: true, job: dryRun ? "repair --dry-run" : "repair")
        defer { lock.release() }
        let report = try CheckJob(repository: repository, readData: .all, progress: progress, cancel: cancel).examine()
        let store = repository.store
        var quarantined: [String] = []
        var lost: [String: [String]] = [:]   // snapshot id -> missing object ids
        var unreadable: [String] = []
        for p in report.problems {
            let namespace = ["chunk": "chunks", "index": "indexes", "snapshot": "snapshots", "verification": "verifications"][p.kind] ?? p.kind
            if p.state == "unreadable" {
                // Not evidence of damage: the object is neither moved nor counted as lost.
                unreadable.append("\(namespace)/\(p.object)")
                continue
            }
            if p.state == "corrupt", p.kind != "snapshot" || CairnCore.Digest(hex: p.object) != nil {
                let key = ObjectKey(namespace, p.object)
                if try store.exists(key) {
                    if !dryRun {
                        guard try quarantine(key) else {
                            unreadable.append("\(namespace)/\(p.object)")
                            continue
                        }
                    }
                    quarantined.append("\(namespace)/\(p.object)")
                }
            }
            for s in p.snapshots where p.kind != "snapshot" { lost[s, default: []].append("\(p.kind) \(p.object)") }
        }
        var marked: [String] = []
        var forgotten: [String] = []
        for (snapshot, missing) in lost.sorted(by: { $0.key < $1.key }) {
            guard let id = CairnCore.Digest(hex: snapshot) else { continue }
            if forgetDamaged {
                if !dryRun { try repository.forgetSnapshot(id) }
                forgotten.append(snapshot)
            } else {
                if !dryRun {
                    try repository.setMark(.damaged, snapshot: id,
                                           SnapshotMark(note: "repair found \(missing.count) object(s) missing or corrupt", missing: missing.sorted()))
                }
                marked.append(snapshot)
            }
        }
        var healed: [String] = []
        for name in try repository.markedSnapshots(.damaged).sorted() where lost[name] == nil {
            guard let id = CairnCore.Digest(hex: name) else { continue }
            if !dryRun { try repository.setMark(.damaged, snapshot: id, nil) }
            healed.append(name)
        }
        if !dryRun { try store.barrier() }
        return RepairReport(dryRun: dryRun, check: report, quarantined: quarantined, markedDamaged: marked,
                            forgotten: forgotten, healed: healed, unreadable: unreadable)
    }

    /// Copies an object to `quarantine/<namespace>-<name>`, then deletes it. Returns false, and
    /// leaves it in place, when its bytes cannot be read: nothing is deleted that was not kept.
    private func quarantine(_ key: ObjectKey) throws -> Bool {
        let store = repository.store
        guard let bytes = try? store.get(key) else { return false }
        try store.put(ObjectKey("quarantine", "\(key.namespace)-\(key.name)"), bytes)
        try store.barrier()
        try store.delete(key)
        return true
    }
}
