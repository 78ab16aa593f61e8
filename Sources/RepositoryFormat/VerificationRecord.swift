import CairnCore
import Foundation

/// How deep a verification goes (docs/VERIFY.md). Levels are cumulative: each runs the ones
/// below it first.
package enum VerifyLevel: String, Codable, Sendable, CaseIterable, Comparable {
    /// Every chunk read, authenticated, decompressed and digest-checked.
    case data
    /// Partition tables and guest file systems opened and walked, plus the native checkers.
    case filesystem
    /// The snapshot booted in an isolated sandbox until a heartbeat.
    case boot

    private var rank: Int {
        switch self {
        case .data: 0
        case .filesystem: 1
        case .boot: 2
        }
    }

    package static func < (a: VerifyLevel, b: VerifyLevel) -> Bool { a.rank < b.rank }

    /// This level and every level below it, lowest first.
    package var cumulative: [VerifyLevel] { Self.allCases.filter { $0 <= self } }
}

/// Whether a level (or a whole verification) passed.
package enum VerifyOutcome: String, Codable, Sendable {
    case passed
    case failed
    /// Not run because a lower level failed.
    case skipped
}

/// The result of one verification of one snapshot (docs/FORMAT.md, "Verification records"):
/// JSON inside an object of kind `verification`, sealed like a manifest (encrypted and
/// authenticated in encrypted repositories: its evidence, such as a screenshot of the guest,
/// is guest data).
package struct VerificationRecord: Codable, Sendable, Equatable {
    /// One level's result.
    package struct LevelResult: Codable, Sendable, Equatable {
        package var level: VerifyLevel
        package var outcome: VerifyOutcome
        /// Why it failed (empty when it passed).
        package var reason: String
        /// What was looked at, one line each ("read 412 chunks (203 MiB)", "p1 ext4: 318 files
        /// walked", "p1: e2fsck -fn clean", ...).
        package var details: [String]
        package var seconds: Double

        package init(level: VerifyLevel, outcome: VerifyOutcome, reason: String = "", details: [String] = [], seconds: Double = 0) {
            self.level = level; self.outcome = outcome; self.reason = reason; self.details = details; self.seconds = seconds
        }
    }

    /// A file kept as proof (a screenshot, a serial log). `data` is base64 in the JSON.
    package struct Evidence: Codable, Sendable, Equatable {
        package var name: String
        package var data: Data

        package init(name: String, data: Data) {
            self.name = name
            self.data = data
        }
    }

    package var version: Int
    /// Hex id of the snapshot verified.
    package var snapshot: String
    package var vm: String
    /// RFC 3339 UTC time the verification started.
    package var time: String
    package var host: String
    package var toolVersion: String
    /// The level asked for (the highest level run when everything passed).
    package var level: VerifyLevel
    package var outcome: VerifyOutcome
    /// Why it failed, naming what failed (empty when it passed).
    package var reason: String
    /// The fraction of chunks read at data level (`--sample`); absent when every chunk was read.
    package var sample: Double?
    /// One entry per level, lowest first.
    package var levels: [LevelResult]
    /// Hex ids of chunks found missing or corrupt (sorted); the next backup stores them again.
    package var badChunks: [String]
    package var evidence: [Evidence]

    package init(snapshot: String, vm: String, time: String, host: String, toolVersion: String, level: VerifyLevel,
                 outcome: VerifyOutcome, reason: String, sample: Double? = nil, levels: [LevelResult],
                 badChunks: [String] = [], evidence: [Evidence] = []) {
        self.version = 1
        self.snapshot = snapshot; self.vm = vm; self.time = time; self.host = host; self.toolVersion = toolVersion
        self.level = level; self.outcome = outcome; self.reason = reason; self.sample = sample; self.levels = levels
        self.badChunks = badChunks; self.evidence = evidence
    }

    /// The lowest level that failed, if any.
    package var failedLevel: VerifyLevel? {
        levels.first { $0.outcome == .failed }?.level
    }

    /// Whether an evidence file name is safe to write into a directory: one plain path
    /// component of printable characters, no leading dot.
    package static func isValidEvidenceName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 128 && !name.hasPrefix(".") && !name.contains("/") && !name.contains("\\")
            && name.unicodeScalars.allSatisfy { $0.value >= 0x20 && $0.value != 0x7F }
    }

    /// Checks the limits of docs/FORMAT.md: evidence count, size and names, the snapshot id.
    package func validate(what: String) throws {
        guard version == 1 else { throw CairnError(.unsupported, "\(what): verification record version \(version) is not supported") }
        guard snapshot.count == 64, CairnCore.Digest(hex: snapshot) != nil else {
            throw CairnError(.corrupt, "\(what): snapshot id '\(snapshot)' is not 64 hex digits")
        }
        guard evidence.count <= Magic.maxEvidenceFiles else {
            throw CairnError(.corrupt, "\(what): \(evidence.count) evidence files, at most \(Magic.maxEvidenceFiles) are allowed")
        }
        let total = evidence.reduce(0) { $0 + $1.data.count }
        guard total <= Magic.maxEvidenceBytes else {
            throw CairnError(.corrupt, "\(what): \(total) bytes of evidence, at most \(Magic.maxEvidenceBytes) are allowed")
        }
        var names = Set<String>()
        for e in evidence {
            guard Self.isValidEvidenceName(e.name), names.insert(e.name).inserted else {
                throw CairnError(.corrupt, "\(what): evidence file name '\(e.name)' is not a plain, unique file name")
            }
        }
        for c in badChunks where CairnCore.Digest(hex: c) == nil {
            throw CairnError(.corrupt, "\(what): bad chunk id '\(c)' is not 64 hex digits")
        }
    }

    package func encode() throws -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return [UInt8](try e.encode(self))
    }

    package static func decode(_ bytes: [UInt8], what: String) throws -> VerificationRecord {
        let r: VerificationRecord
        do {
            r = try JSONDecoder().decode(VerificationRecord.self, from: Data(bytes))
        } catch {
            throw CairnError(.corrupt, "\(what): verification record is not valid JSON of the expected shape (\(error))")
        }
        try r.validate(what: what)
        return r
    }

    // MARK: object names

    /// The object's name in `verifications/`: `<snapshot id>-<time>-<record id>`, the time as
    /// `YYYYMMDDTHHMMSS.fffZ` (the RFC 3339 time without `-` and `:`), so that a snapshot's
    /// records sort oldest first by name.
    package static func objectName(snapshot: String, time: String, id: CairnCore.Digest) -> String {
        let compact = String(time.filter { $0 != "-" && $0 != ":" })
        return "\(snapshot)-\(compact)-\(id.hex)"
    }

    /// The snapshot id and record id a name carries, or nil when it is not a record's name.
    package static func parseObjectName(_ name: String) -> (snapshot: CairnCore.Digest, id: CairnCore.Digest)? {
        let parts = name.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0].count == 64, parts[2].count == 64, !parts[1].isEmpty,
              parts[1].allSatisfy({ $0.isNumber || $0 == "T" || $0 == "Z" || $0 == "." }),
              let snapshot = CairnCore.Digest(hex: String(parts[0])), let id = CairnCore.Digest(hex: String(parts[2])) else { return nil }
        return (snapshot, id)
    }
}
