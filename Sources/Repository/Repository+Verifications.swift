import CairnCore
import Foundation
import RepositoryFormat
import Storage

/// Verification records (docs/FORMAT.md, "Verification records"; docs/VERIFY.md): what
/// `cairn verify` found for each snapshot, kept beside the manifests in `verifications/`.
/// Each is an object of kind `verification` named `<snapshot id>-<time>-<record id>`; a
/// snapshot may have many (its history), the newest one counts.
extension Repository {
    package static let verificationNamespace = ObjectKind.verification.directory

    /// Stores a record (sealed like a manifest: encrypted and authenticated when the repository
    /// is) and makes its name durable. Returns the object's name.
    @discardableResult
    package func saveVerification(_ record: VerificationRecord) throws -> String {
        try record.validate(what: "verification record of snapshot \(record.snapshot)")
        let plain = try record.encode()
        guard plain.count <= Magic.maxVerificationRecordBytes else {
            throw CairnError(.usage, "verification record of snapshot \(record.snapshot) is \(plain.count) bytes, more than \(Magic.maxVerificationRecordBytes)",
                             hint: "keep less evidence")
        }
        let codec = makeCodec()
        let id = codec.id(of: plain)
        let sealed = try codec.seal(kind: .verification, id: id, plaintext: plain)
        let name = VerificationRecord.objectName(snapshot: record.snapshot, time: record.time, id: id)
        try store.put(ObjectKey(Self.verificationNamespace, name), sealed)
        try store.barrier()
        return name
    }

    /// Names of every stored record with the snapshot they belong to (names that are not a
    /// record's are ignored: they are not ours).
    package func verificationNames() throws -> [(name: String, snapshot: CairnCore.Digest)] {
        try store.list(Self.verificationNamespace).compactMap { name in
            VerificationRecord.parseObjectName(name).map { (name, $0.snapshot) }
        }.sorted { $0.name < $1.name }
    }

    /// Reads, authenticates and decodes one record; checks that it belongs to the snapshot its
    /// name says (a record cannot be moved to another snapshot).
    package func loadVerification(named name: String, codec: ObjectCodec) throws -> VerificationRecord {
        guard let (snapshot, id) = VerificationRecord.parseObjectName(name) else {
            throw CairnError(.usage, "'\(name)' is not the name of a verification record")
        }
        let key = ObjectKey(Self.verificationNamespace, name)
        func once() throws -> VerificationRecord {
            let bytes = try store.get(key)
            do {
                let plain = try codec.open(kind: .verification, id: id, object: bytes, limit: Magic.maxVerificationRecordBytes)
                let record = try VerificationRecord.decode(plain, what: "verification record \(name)")
                guard record.snapshot == snapshot.hex else {
                    throw CairnError(.corrupt, "verification record \(name) belongs to snapshot \(record.snapshot), not to the one its name gives")
                }
                return record
            } catch var e as CairnError {
                e.path = store.path(for: key)
                throw e
            }
        }
        do {
            return try once()
        } catch let e as CairnError where e.code == .corrupt || e.code == .unsupported {
            return try once()   // once more: see loadChunk
        }
    }

    /// Every readable record, per snapshot (hex), oldest first; unreadable ones in `failures`.
    package func allVerifications() throws -> (records: [String: [VerificationRecord]], failures: [(name: String, error: CairnError)]) {
        let codec = makeCodec()
        var records: [String: [VerificationRecord]] = [:]
        var failures: [(name: String, error: CairnError)] = []
        for (name, snapshot) in try verificationNames() {
            do {
                records[snapshot.hex, default: []].append(try loadVerification(named: name, codec: codec))
            } catch let e as CairnError where e.code == .notFound {
                continue   // deleted since the listing (prune, gc)
            } catch let e as CairnError {
                failures.append((name, e))
            }
        }
        for k in records.keys { records[k]!.sort { $0.time < $1.time } }
        return (records, failures)
    }

    /// The records of one snapshot, oldest first (unreadable ones are left out).
    package func verifications(for snapshot: CairnCore.Digest) throws -> [VerificationRecord] {
        let codec = makeCodec()
        var out: [VerificationRecord] = []
        for (name, s) in try verificationNames() where s == snapshot {
            do {
                out.append(try loadVerification(named: name, codec: codec))
            } catch let e as CairnError where e.code != .io && e.code != .noSpace {
                continue
            }
        }
        return out.sorted { $0.time < $1.time }
    }

    /// The newest readable record of every snapshot that has one: snapshot hex -> record.
    package func latestVerifications() throws -> [String: VerificationRecord] {
        try allVerifications().records.compactMapValues(\.last)
    }

    /// Snapshots (hex) whose newest record failed.
    package func failedSnapshots() throws -> Set<String> {
        Set(try latestVerifications().filter { $0.value.outcome == .failed }.keys)
    }

    /// Chunk ids the newest record of a failed snapshot names as missing or corrupt: a backup
    /// stores these again instead of deduplicating against them (docs/VERIFY.md, "Healing").
    ///
    /// Each such chunk is read once more: one a later backup has stored again (or that `repair`
    /// replaced) reads intact and is not bad any more, so healing happens once, not on every
    /// backup until the failed snapshot is verified again.
    package func badChunks() throws -> Set<CairnCore.Digest> {
        var named = Set<CairnCore.Digest>()
        for record in try latestVerifications().values where record.outcome == .failed {
            for hex in record.badChunks { if let d = CairnCore.Digest(hex: hex) { named.insert(d) } }
        }
        guard !named.isEmpty else { return named }
        let codec = makeCodec()
        var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize + 4096, alignment: 16)
        let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 16)
        defer { scratch.deallocate(); plain.deallocate() }
        return named.filter { id in
            (try? loadChunk(id, codec: codec, scratch: &scratch, into: plain)) == nil
        }
    }

    /// Deletes every record of `snapshot` (forget, gc).
    @discardableResult
    package func deleteVerifications(of snapshot: CairnCore.Digest) throws -> Int {
        var n = 0
        for (name, s) in try verificationNames() where s == snapshot {
            try store.delete(ObjectKey(Self.verificationNamespace, name))
            n += 1
        }
        return n
    }
}
