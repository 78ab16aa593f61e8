import CairnCore
import Foundation
import RepositoryFormat
import Repository
import Storage
import Synchronization

/// One problem found by `check`, with the snapshots and disks it affects.
package struct CheckProblem: Sendable, Codable {
    /// `chunk`, `index` or `snapshot`.
    package var kind: String
    /// The object's id (or file name).
    package var object: String
    /// `missing` (no such object), `corrupt` (read, but it does not decode, authenticate or
    /// match its id) or `unreadable` (the storage failed to deliver it: an I/O error that
    /// persisted through the retries; the object itself may be intact).
    package var state: String
    package var message: String
    /// Who uses it: "snapshot <short> (<vm>, <time>) disk <name>".
    package var affected: [String]
    /// Ids (hex) of the snapshots that lost data through it.
    package var snapshots: [String]
}

/// Which chunks `check` reads: none, all, a random fraction, or the n-th of m groups (by the
/// first byte of the id, like restic's `--read-data-subset n/m`).
package enum ReadDataSelection: Sendable, Equatable {
    case none
    case all
    case fraction(Double)
    case group(Int, of: Int)

    /// Parses `10%`, `2.5%`, `1/5`.
    package static func parse(_ text: String) throws -> ReadDataSelection {
        if text.hasSuffix("%"), let p = Double(text.dropLast()), p > 0, p <= 100 { return .fraction(p / 100) }
        let parts = text.split(separator: "/")
        if parts.count == 2, let n = Int(parts[0]), let m = Int(parts[1]), m >= 1, m <= 256, n >= 1, n <= m { return .group(n, of: m) }
        throw CairnError(.usage, "cannot read the subset '\(text)'", hint: "give a percentage like 10% or a group like 1/5 (n of m, m <= 256)")
    }

    func selects(_ id: CairnCore.Digest, random: inout SystemRandomNumberGenerator) -> Bool {
        switch self {
        case .none: return false
        case .all: return true
        case .fraction(let f): return Double.random(in: 0..<1, using: &random) < f
        case .group(let n, let m): return Int(id.w0 >> 56) % m == n - 1
        }
    }
}

package struct CheckReport: Sendable, Codable {
    package var snapshots: Int
    package var indexes: Int
    package var referencedChunks: Int
    package var storedChunks: Int
    package var unreferencedChunks: Int
    /// Indexes no snapshot names (left by prune or an interrupted backup until gc).
    package var unreferencedIndexes: Int
    package var chunksRead: Int
    package var bytesRead: UInt64
    /// Verification records read (docs/VERIFY.md); those of snapshots that no longer exist
    /// are counted in `orphanedVerifications` (not an error; gc removes them).
    package var verifications: Int
    package var orphanedVerifications: Int
    package var problems: [CheckProblem]
    package var ok: Bool { problems.isEmpty }
}

/// Verifies the repository's structure, and with `readData` every referenced chunk's bytes.
package final class CheckJob: @unchecked Sendable {
    package let repository: Repository
    package let readData: ReadDataSelection
    package let progress: any ProgressReporter
    package let cancel: CancellationToken
    package let workers: Int

    package init(repository: Repository, readData: ReadDataSelection, progress: any ProgressReporter = SilentProgress(),
                 cancel: CancellationToken = CancellationToken(), workers: Int = defaultIOWorkerCount()) {
        self.repository = repository; self.readData = readData; self.progress = progress; self.cancel = cancel; self.workers = workers
    }

    /// How a failed load is classified (see `CheckProblem.state`).
    static func state(of error: CairnError) -> String {
        switch error.code {
        case .io, .noSpace: "unreadable"
        case .notFound: "missing"
        default: error.message.contains("is missing") ? "missing" : "corrupt"
        }
    }

    package func run() throws -> CheckReport {
        let lock = try repository.lock(exclusive: false, job: "check")
        defer { lock.release() }
        return try examine()
    }

    /// The check itself, for a caller that already holds a lock (repair).
    package func examine() throws -> CheckReport {
        let started = Date()
        let codec = repository.makeCodec()
        var problems: [CheckProblem] = []
        let (snapshots, failures) = try repository.listSnapshots(codec: codec)
        for (name, e) in failures where e.code != .notFound {
            problems.append(CheckProblem(kind: "snapshot", object: name, state: Self.state(of: e), message: e.description,
                                         affected: ["snapshot \(name)"], snapshots: [name]))
        }
        // Which snapshot/disk uses which chunk, and each chunk's length.
        // Who uses each chunk, compactly (memory stays a few dozen bytes per chunk at 10^6
        // chunks): `disks[k]` is one snapshot disk; a chunk maps to the first disk using it,
        // and only chunks shared by several disks get a list of the others.
        var disks: [(who: String, snapshot: String)] = []
        var firstUser: [CairnCore.Digest: (length: Int32, disk: UInt32)] = [:]
        var moreUsers: [CairnCore.Digest: [UInt32]] = [:]
        func users(_ id: CairnCore.Digest) -> [String] {
            guard let f = firstUser[id] else { return [] }
            return ([f.disk] + (moreUsers[id] ?? [])).map { disks[Int($0)].who }
        }
        func userSnapshots(_ id: CairnCore.Digest) -> [String] {
            guard let f = firstUser[id] else { return [] }
            var out: [String] = []
            for k in [f.disk] + (moreUsers[id] ?? []) where out.last != disks[Int(k)].snapshot { out.append(disks[Int(k)].snapshot) }
            return out
        }
        var indexNames = Set<String>()
        var indexes = 0
        for s in snapshots {
            for d in s.manifest.disks {
              for (what, hex) in d.indexReferences {   // the disk index and the file catalog
                let who = "snapshot \(s.id.short) (\(s.manifest.vm), \(s.manifest.time)) disk \(d.name)" + (what == "index" ? "" : " \(what)")
                guard let indexID = CairnCore.Digest(hex: hex) else {
                    problems.append(CheckProblem(kind: "index", object: hex, state: "corrupt", message: "invalid \(what) id",
                                                 affected: [who], snapshots: [s.id.hex]))
                    continue
                }
                indexNames.insert(indexID.hex)
                do {
                    let index = try repository.loadIndex(indexID, codec: codec)
                    indexes += 1
                    let k = UInt32(disks.count)
                    disks.append((who, s.id.hex))
                    for (i, id) in index.entries.enumerated() where !id.isZero {
                        if let f = firstUser[id] {
                            if f.disk != k && moreUsers[id]?.last != k { moreUsers[id, default: []].append(k) }
                        } else {
                            firstUser[id] = (Int32(index.length(ofChunk: i)), k)
                        }
                    }
                } catch let e as CairnError {
                    problems.append(CheckProblem(kind: "index", object: indexID.hex, state: Self.state(of: e),
                                                 message: e.description, affected: [who], snapshots: [s.id.hex]))
                }
              }
            }
        }
        let stored = try repository.listChunkIDs()
        let referenced = Set(firstUser.keys)
        for id in referenced.subtracting(stored).sorted() {
            problems.append(CheckProblem(kind: "chunk", object: id.hex, state: "missing", message: "chunk \(id.hex) is missing",
                                         affected: users(id), snapshots: userSnapshots(id)))
        }
        var chunksRead = 0
        var bytesRead: UInt64 = 0
        if readData != .none {
            var random = SystemRandomNumberGenerator()
            let toRead = referenced.intersection(stored).sorted().filter { readData.selects($0, random: &random) }
            var lengths: [CairnCore.Digest: Int] = [:]
            for id in toRead { if let f = firstUser[id] { lengths[id] = Int(f.length) } }
            let (bad, bytes) = try verifyChunks(toRead, lengths: lengths, repository: repository, workers: workers, cancel: cancel,
                                                progress: progress, phase: "check", started: started)
            for (id, error) in bad.sorted(by: { $0.key < $1.key }) {
                problems.append(CheckProblem(kind: "chunk", object: id.hex, state: Self.state(of: error),
                                             message: error.description, affected: users(id), snapshots: userSnapshots(id)))
            }
            chunksRead = toRead.count
            bytesRead = bytes
        }
        // Verification records: each must open (authenticated when encrypted) and decode.
        var verifications = 0, orphanedVerifications = 0
        let snapshotNames = Set(snapshots.map(\.id.hex)).union(failures.map(\.0))
        for (name, snapshot) in try repository.verificationNames() {
            do {
                _ = try repository.loadVerification(named: name, codec: codec)
                verifications += 1
                if !snapshotNames.contains(snapshot.hex) { orphanedVerifications += 1 }
            } catch let e as CairnError where e.code == .notFound {
                continue
            } catch let e as CairnError {
                problems.append(CheckProblem(kind: "verification", object: name, state: Self.state(of: e), message: e.description,
                                             affected: ["verification record of snapshot \(snapshot.short)"], snapshots: []))
            }
        }
        return CheckReport(snapshots: snapshots.count, indexes: indexes, referencedChunks: referenced.count, storedChunks: stored.count,
                           unreferencedChunks: stored.subtracting(referenced).count,
                           unreferencedIndexes: Set(try repository.store.list("indexes")).subtracting(indexNames).count, chunksRead: chunksRead, bytesRead: bytesRead,
                           verifications: verifications, orphanedVerifications: orphanedVerifications, problems: problems)
    }
}

/// Repository statistics: logical vs stored bytes, dedup and compression ratios.
package struct RepositoryStats: Sendable, Codable {
    package var snapshots: Int
    package var disks: Int
    /// Sum of the virtual sizes of every disk of every snapshot.
    package var logicalBytes: UInt64
    /// Bytes of non-zero chunks referenced, counted once per reference.
    package var referencedDataBytes: UInt64
    /// Bytes of distinct chunks (before compression).
    package var uniqueDataBytes: UInt64
    package var chunks: Int
    /// Bytes of every file in the repository.
    package var storedBytes: UInt64
    package var storedChunkBytes: UInt64
    package var deduplicationRatio: Double
    package var compressionRatio: Double
    /// logicalBytes / storedBytes.
    package var totalRatio: Double

    package static func compute(repository: Repository) throws -> RepositoryStats {
        let codec = repository.makeCodec()
        let snapshots = try repository.listSnapshots(codec: codec).snapshots
        var logical: UInt64 = 0, referenced: UInt64 = 0, disks = 0
        var lengths: [CairnCore.Digest: Int] = [:]
        for s in snapshots {
            for d in s.manifest.disks {
                disks += 1
                logical += d.virtualSize
                guard let id = CairnCore.Digest(hex: d.index) else { continue }
                let index = try repository.loadIndex(id, codec: codec)
                for (i, e) in index.entries.enumerated() where !e.isZero {
                    let n = index.length(ofChunk: i)
                    referenced += UInt64(n)
                    lengths[e] = n
                }
            }
        }
        let unique = lengths.values.reduce(UInt64(0)) { $0 + UInt64($1) }
        var storedChunks: UInt64 = 0
        var storedAll: UInt64 = 0
        for id in try repository.listChunkIDs() {
            storedChunks += try repository.store.size(Repository.chunkKey(id)) ?? 0
        }
        storedAll = storedChunks
        for ns in ["indexes", "snapshots", "keys", Repository.verificationNamespace] {
            for name in try repository.store.list(ns) {
                storedAll += try repository.store.size(ObjectKey(ns, name)) ?? 0
            }
        }
        storedAll += try repository.store.size(ObjectKey("", "config")) ?? 0
        func ratio(_ a: UInt64, _ b: UInt64) -> Double { b == 0 ? 0 : (Double(a) / Double(b) * 100).rounded() / 100 }
        return RepositoryStats(snapshots: snapshots.count, disks: disks, logicalBytes: logical, referencedDataBytes: referenced,
                               uniqueDataBytes: unique, chunks: lengths.count, storedBytes: storedAll, storedChunkBytes: storedChunks,
                               deduplicationRatio: ratio(referenced, unique), compressionRatio: ratio(unique, storedChunks),
                               totalRatio: ratio(logical, storedAll))
    }
}
