import CairnCore
import Foundation
import RepositoryFormat
import Storage

/// A snapshot as listed: its id and its manifest.
package struct SnapshotEntry: Sendable {
    package var id: CairnCore.Digest
    package var manifest: Manifest
    package var date: Date { parseTimestamp(manifest.time) ?? .distantPast }
    package init(id: CairnCore.Digest, manifest: Manifest) {
        self.id = id
        self.manifest = manifest
    }
}

extension Repository {
    package static func chunkKey(_ id: CairnCore.Digest) -> ObjectKey { ObjectKey("chunks", id.hex) }

    /// Every chunk id present in the store (for dedup and check).
    package func listChunkIDs() throws -> Set<CairnCore.Digest> {
        var out = Set<CairnCore.Digest>()
        for name in try store.list("chunks") {
            if let d = CairnCore.Digest(hex: name) { out.insert(d) }
        }
        return out
    }

    /// Stores a sealed chunk (bytes from `ObjectCodec.seal`).
    package func putChunk(_ id: CairnCore.Digest, sealed: UnsafeRawBufferPointer) throws {
        try store.put(Repository.chunkKey(id), sealed)
    }

    /// Reads, authenticates, decompresses and digest-checks a chunk into `into`.
    /// `scratch` is a reusable buffer for the stored bytes.
    package func loadChunk(_ id: CairnCore.Digest, codec: ObjectCodec, scratch: inout UnsafeMutableRawBufferPointer,
                           into: UnsafeMutableRawBufferPointer) throws -> Int {
        // A read that does not authenticate is read once more before the chunk is called
        // corrupt: a torn or flipped read on the way (a flaky disk, a network store) is not rot.
        for attempt in 1...2 {
            let n: Int
            do {
                n = try store.get(Repository.chunkKey(id), into: &scratch)
            } catch let e as CairnError where e.code == .notFound {
                throw CairnError(.corrupt, "chunk \(id.hex) is missing", path: store.path(for: Repository.chunkKey(id)),
                                 hint: "run `cairn check` to list the snapshots affected")
            }
            do {
                return try codec.open(kind: .chunk, id: id, object: UnsafeRawBufferPointer(rebasing: scratch[0..<n]), into: into)
            } catch var e as CairnError {
                if (e.code == .corrupt || e.code == .unsupported) && attempt == 1 { continue }
                e.path = store.path(for: Repository.chunkKey(id))
                throw e
            }
        }
        fatalError("unreachable: the second attempt returns or throws")
    }

    // MARK: indexes

    package func writeIndex(_ index: DiskIndex, codec: ObjectCodec) throws -> CairnCore.Digest {
        let plain = index.encode()
        let id = codec.id(of: plain)
        let sealed = try codec.seal(kind: .index, id: id, plaintext: plain)
        try store.put(ObjectKey("indexes", id.hex), sealed)
        return id
    }

    package func loadIndex(_ id: CairnCore.Digest, codec: ObjectCodec) throws -> DiskIndex {
        do {
            return try loadIndexOnce(id, codec: codec)
        } catch let e as CairnError where (e.code == .corrupt || e.code == .unsupported) && !e.message.contains("is missing") {
            return try loadIndexOnce(id, codec: codec)   // once more: see loadChunk
        }
    }

    private func loadIndexOnce(_ id: CairnCore.Digest, codec: ObjectCodec) throws -> DiskIndex {
        let key = ObjectKey("indexes", id.hex)
        let bytes: [UInt8]
        do {
            bytes = try store.get(key)
        } catch let e as CairnError where e.code == .notFound {
            throw CairnError(.corrupt, "index \(id.hex) is missing", path: store.path(for: key))
        }
        do {
            let plain = try codec.open(kind: .index, id: id, object: bytes)
            return try DiskIndex.decode(plain, what: "index \(id.hex)")
        } catch var e as CairnError {
            e.path = store.path(for: key)
            throw e
        }
    }

    // MARK: manifests

    package func writeManifest(_ manifest: Manifest, codec: ObjectCodec) throws -> CairnCore.Digest {
        let plain = try manifest.encode()
        let id = codec.id(of: plain)
        let sealed = try codec.seal(kind: .manifest, id: id, plaintext: plain)
        try store.put(ObjectKey("snapshots", id.hex), sealed)
        try store.barrier()
        return id
    }

    package func loadManifest(_ id: CairnCore.Digest, codec: ObjectCodec) throws -> Manifest {
        do {
            return try loadManifestOnce(id, codec: codec)
        } catch let e as CairnError where e.code == .corrupt || e.code == .unsupported {
            return try loadManifestOnce(id, codec: codec)   // once more: see loadChunk
        }
    }

    private func loadManifestOnce(_ id: CairnCore.Digest, codec: ObjectCodec) throws -> Manifest {
        let key = ObjectKey("snapshots", id.hex)
        let bytes = try store.get(key)
        do {
            let plain = try codec.open(kind: .manifest, id: id, object: bytes, limit: 64 << 20)
            return try Manifest.decode(plain, what: "snapshot \(id.hex)")
        } catch var e as CairnError {
            e.path = store.path(for: key)
            throw e
        }
    }

    /// All snapshots, oldest first. Unreadable manifests are returned in `failures`.
    package func listSnapshots(codec: ObjectCodec) throws -> (snapshots: [SnapshotEntry], failures: [(String, CairnError)]) {
        var out: [SnapshotEntry] = []
        var failures: [(String, CairnError)] = []
        for name in try store.list("snapshots") {
            guard let id = CairnCore.Digest(hex: name) else { continue }
            do {
                out.append(SnapshotEntry(id: id, manifest: try loadManifest(id, codec: codec)))
            } catch let e as CairnError {
                failures.append((name, e))
            }
        }
        out.sort { ($0.manifest.time, $0.id.hex) < ($1.manifest.time, $1.id.hex) }
        return (out, failures)
    }

    /// Resolves a snapshot reference: a full id, a unique id prefix, or `latest` (optionally
    /// for one VM).
    package func resolveSnapshot(_ ref: String, vm: String?, codec: ObjectCodec) throws -> SnapshotEntry {
        let (listed, failures) = try listSnapshots(codec: codec)
        let all = listed.filter { vm == nil || $0.manifest.vm == vm }
        if ref == "latest" {
            guard let last = all.last else {
                throw CairnError(.notFound, vm.map { "no snapshot of VM \($0)" } ?? "the repository has no snapshots")
            }
            return last
        }
        let lower = ref.lowercased()
        guard !lower.isEmpty, lower.allSatisfy({ $0.isHexDigit }) else {
            throw CairnError(.usage, "snapshot reference '\(ref)' is neither an id, an id prefix nor 'latest'")
        }
        let matches = all.filter { $0.id.hex.hasPrefix(lower) }
        if matches.count == 1 { return matches[0] }
        if matches.isEmpty {
            // A snapshot that exists but cannot be read is reported as what it is, not as absent.
            if let (name, error) = failures.first(where: { $0.0.hasPrefix(lower) && $0.1.code != .notFound }) {
                var e = error
                e.message = "snapshot \(name) cannot be read: " + e.message
                e.hint = e.hint ?? "run `cairn check`; `cairn repair` sets the damaged manifest aside"
                throw e
            }
            throw CairnError(.notFound, "no snapshot matches '\(ref)'")
        }
        throw CairnError(.usage, "snapshot prefix '\(ref)' is ambiguous (\(matches.count) snapshots)", hint: "give more digits")
    }
}
