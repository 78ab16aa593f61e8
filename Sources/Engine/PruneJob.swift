import CairnCore
import Foundation
import Repository
import RepositoryFormat

/// One snapshot's fate in a prune.
package struct PruneDecision: Sendable, Codable {
    package var id: String
    package var vm: String
    package var time: String
    package var keep: Bool
    package var reasons: [String]
}

package struct PruneReport: Sendable, Codable {
    package var dryRun: Bool
    package var decisions: [PruneDecision]
    /// Manifests that could not be read: never removed by prune.
    package var unreadable: [String]
    package var removed: Int { dryRun ? 0 : decisions.filter { !$0.keep }.count }
    package var wouldRemove: Int { decisions.filter { !$0.keep }.count }
}

/// Applies a retention policy per VM (docs/RETENTION.md) and forgets the snapshots it does not
/// keep. Only manifests (and their marks) are deleted; `cairn gc` frees the data afterwards.
///
/// Runs under a shared lock: forgetting a manifest never removes data a running job reads (a
/// restore or a backup holds the chunks it uses through its own shared lock until gc's
/// exclusive sweep, which also sees every manifest written meanwhile).
package final class PruneJob: Sendable {
    package let repository: Repository
    package let policy: RetentionPolicy
    package let vm: String?
    package let dryRun: Bool

    package init(repository: Repository, policy: RetentionPolicy, vm: String? = nil, dryRun: Bool = false) {
        self.repository = repository; self.policy = policy; self.vm = vm; self.dryRun = dryRun
    }

    package func run(now: Date = Date()) throws -> PruneReport {
        guard !policy.isEmpty else {
            throw CairnError(.usage, "no retention option given; prune would keep everything",
                             hint: "give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-within")
        }
        let lock = try repository.lock(exclusive: false, job: dryRun ? "prune --dry-run" : "prune")
        defer { lock.release() }
        let codec = repository.makeCodec()
        let (snapshots, failures) = try repository.listSnapshots(codec: codec)
        let protected = try repository.markedSnapshots(.protected)
        var byVM: [String: [SnapshotEntry]] = [:]
        for s in snapshots where vm == nil || s.manifest.vm == vm { byVM[s.manifest.vm, default: []].append(s) }
        var decisions: [PruneDecision] = []
        for name in byVM.keys.sorted() {
            let group = byVM[name]!
            let byID = Dictionary(uniqueKeysWithValues: group.map { ($0.id.hex, $0) })
            let candidates = group.map { RetentionCandidate(id: $0.id.hex, time: $0.date, protected: protected.contains($0.id.hex)) }
            for d in Retention.apply(policy, to: candidates, now: now) {
                guard let s = byID[d.id] else { continue }
                decisions.append(PruneDecision(id: d.id, vm: name, time: s.manifest.time, keep: d.keep, reasons: d.reasons))
            }
        }
        if !dryRun {
            for d in decisions where !d.keep {
                guard let id = CairnCore.Digest(hex: d.id) else { continue }
                try repository.forgetSnapshot(id)
            }
            try repository.store.barrier()
        }
        return PruneReport(dryRun: dryRun, decisions: decisions,
                           unreadable: failures.filter { $0.1.code != .notFound }.map { $0.0 }.sorted())
    }
}
