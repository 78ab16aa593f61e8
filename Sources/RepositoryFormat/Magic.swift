import CairnCore
/// Every magic number and fixed size of repository format v1, in one place.
/// The byte layouts are specified in docs/FORMAT.md.
package enum Magic {
    /// Object envelope: "CRNO".
    package static let object: [UInt8] = Array("CRNO".utf8)
    package static let objectHeaderSize = 32
    package static let objectVersion: UInt8 = 1
    package static let nonceSize = 12
    package static let tagSize = 16

    /// Disk index: "CAIRNIDX".
    package static let index: [UInt8] = Array("CAIRNIDX".utf8)
    package static let indexHeaderSize = 64
    package static let indexVersion: UInt32 = 1
    package static let indexEntrySize = 32

    /// Repository format version written by this code, and the range it reads.
    package static let repositoryVersion = 1
    package static let readableRepositoryVersions = 1...1

    package static let minChunkSize = 64 << 10
    package static let maxChunkSize = 8 << 20
    package static let defaultChunkSize = 512 << 10

    /// Verification records (docs/FORMAT.md, "Verification records"): at most this many
    /// evidence files of at most `maxEvidenceBytes` together, and a record's plaintext (JSON,
    /// evidence in base64) at most `maxVerificationRecordBytes`.
    package static let maxEvidenceFiles = 16
    package static let maxEvidenceBytes = 16 << 20
    package static let maxVerificationRecordBytes = 24 << 20
}

/// What an object is. Bound into the authenticated data of every encrypted object, so bytes
/// stored as one kind can never be opened as another (a guest's chunk as a manifest).
package enum ObjectKind: UInt8, Sendable, CaseIterable {
    case chunk = 1
    case index = 2
    case manifest = 3
    case verification = 4

    package var directory: String {
        switch self {
        case .chunk: "chunks"
        case .index: "indexes"
        case .manifest: "snapshots"
        case .verification: "verifications"
        }
    }
}

package enum CompressionAlgorithm: UInt8, Sendable {
    case none = 0
    case zstd = 1
}

package enum EncryptionAlgorithm: UInt8, Sendable {
    case none = 0
    case aes256gcm = 1

    package var name: String {
        switch self {
        case .none: "none"
        case .aes256gcm: "aes-256-gcm"
        }
    }

    package init?(name: String) {
        switch name {
        case "none": self = .none
        case "aes-256-gcm", "aes256gcm", "aes": self = .aes256gcm
        default: return nil
        }
    }
}

/// Crypto also has a `Digest`; inside this module the name means Cairn's 32-byte id.
package typealias Digest = CairnCore.Digest
