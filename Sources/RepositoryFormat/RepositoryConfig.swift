import CairnCore

/// The repository's `config` file (plain JSON; specified in docs/FORMAT.md).
/// It holds no secrets: what is needed to open the repository and to write compatible objects.
package struct RepositoryConfig: Codable, Sendable, Equatable {
    package var version: Int
    /// 32 random bytes, hex.
    package var id: String
    package var chunkSize: Int
    package var compression: String
    package var compressionLevel: Int
    package var encryption: String

    package init(id: String, chunkSize: Int, compressionLevel: Int = 3, encryption: EncryptionAlgorithm) {
        self.version = Magic.repositoryVersion
        self.id = id
        self.chunkSize = chunkSize
        self.compression = "zstd"
        self.compressionLevel = compressionLevel
        self.encryption = encryption.name
    }

    package static func validChunkSize(_ n: Int) -> Bool {
        n >= Magic.minChunkSize && n <= Magic.maxChunkSize && n & (n - 1) == 0
    }

    /// Checks what a reader must check before trusting the file.
    package func validate(path: String) throws {
        guard Magic.readableRepositoryVersions.contains(version) else {
            throw CairnError(.unsupported, "repository format version \(version) is not readable by this cairn (reads \(Magic.readableRepositoryVersions))", path: path, hint: "upgrade cairn")
        }
        guard RepositoryConfig.validChunkSize(chunkSize) else {
            throw CairnError(.corrupt, "config chunkSize \(chunkSize) is not a power of two in 64 KiB..8 MiB", path: path)
        }
        guard compression == "zstd" || compression == "none" else {
            throw CairnError(.unsupported, "config compression \(compression) is unknown", path: path)
        }
        guard (-7...19).contains(compressionLevel) else {
            throw CairnError(.corrupt, "config compressionLevel \(compressionLevel) is out of range", path: path)
        }
        guard encryptionAlgorithm != nil else {
            throw CairnError(.unsupported, "config encryption \(encryption) is unknown", path: path)
        }
    }

    package var encryptionAlgorithm: EncryptionAlgorithm? { EncryptionAlgorithm(name: encryption) }
}
