import CairnCore
import Foundation
import RepositoryFormat
import Storage

/// A marker file next to a snapshot (docs/FORMAT.md, "Snapshot marks"): `protected/<id>` keeps
/// a snapshot from prune; `damaged/<id>` records what `cairn repair` found missing. Manifests
/// are immutable, so these states live beside them. Plain JSON: they carry no guest data.
package struct SnapshotMark: Codable, Sendable, Equatable {
    package var version: Int
    package var time: String
    package var host: String
    /// Free text: why it was protected, or what was lost.
    package var note: String
    /// For `damaged`: the chunk and index ids the snapshot references that are gone.
    package var missing: [String]?

    package init(note: String, missing: [String]? = nil) {
        self.version = 1
        self.time = timestamp()
        self.host = hostName()
        self.note = note
        self.missing = missing
    }
}

package enum SnapshotMarkKind: String, Sendable, CaseIterable {
    case protected
    case damaged
}

extension Repository {
    /// Snapshot ids (hex) that carry `kind`; markers that are not readable count as set
    /// (a protected snapshot is never lost because its marker was damaged).
    package func markedSnapshots(_ kind: SnapshotMarkKind) throws -> Set<String> {
        Set(try store.list(kind.rawValue).filter { CairnCore.Digest(hex: $0) != nil })
    }

    package func mark(_ kind: SnapshotMarkKind, snapshot id: CairnCore.Digest) throws -> SnapshotMark? {
        let bytes: [UInt8]
        do {
            bytes = try store.get(ObjectKey(kind.rawValue, id.hex))
        } catch let e as CairnError where e.code == .notFound {
            return nil
        }
        return try? JSONDecoder().decode(SnapshotMark.self, from: Data(bytes))
    }

    package func setMark(_ kind: SnapshotMarkKind, snapshot id: CairnCore.Digest, _ mark: SnapshotMark?) throws {
        let key = ObjectKey(kind.rawValue, id.hex)
        if let mark {
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys]
            try store.put(key, [UInt8](try enc.encode(mark)))
        } else {
            try store.delete(key)
        }
        try store.barrier()
    }

    /// Deletes a snapshot's manifest (its marks and verification records go with it). Chunks
    /// and indexes stay until gc.
    package func forgetSnapshot(_ id: CairnCore.Digest) throws {
        try store.delete(ObjectKey("snapshots", id.hex))
        for kind in SnapshotMarkKind.allCases { try store.delete(ObjectKey(kind.rawValue, id.hex)) }
        try deleteVerifications(of: id)
    }
}
