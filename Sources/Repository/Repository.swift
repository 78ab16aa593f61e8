import CairnCore
import Foundation
import RepositoryFormat
import Storage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An open repository: its config, its keys (when encrypted) and its store.
///
/// Writes follow the order of docs/FORMAT.md: chunks, then the disk indexes, then the
/// manifest, each durable before the next is written, so a snapshot exists only when
/// everything it references exists.
package final class Repository: Sendable {
    package let config: RepositoryConfig
    package let keys: MasterKeys?
    package let store: any ObjectStore
    /// Where the repository is, for messages and lock files (a directory path for a local one).
    package let path: String

    /// How long `lock` waits for conflicting locks by default (`--retry-lock`).
    package let lockWait: TimeInterval

    package var chunkSize: Int { config.chunkSize }
    package var isEncrypted: Bool { keys != nil }

    private init(config: RepositoryConfig, keys: MasterKeys?, store: any ObjectStore, lockWait: TimeInterval = 0) {
        self.path = store.location
        self.lockWait = lockWait
        self.config = config
        self.keys = keys
        self.store = store
    }

    package func makeCodec() -> ObjectCodec {
        ObjectCodec(keys: keys, compressionLevel: config.compressionLevel)
    }

    // MARK: create and open

    package static func configPath(_ path: String) -> String { "\(path)/config" }

    /// Creates a new repository at `path` (an empty or missing directory).
    package static func initialize(path: String, encryption: EncryptionAlgorithm, chunkSize: Int, passphrase: String?,
                                   compressionLevel: Int = 3, scryptN: Int = KeyFile.defaultN) throws -> Repository {
        guard RepositoryConfig.validChunkSize(chunkSize) else {
            throw CairnError(.usage, "chunk size \(chunkSize) must be a power of two between 64 KiB and 8 MiB")
        }
        let fm = FileManager.default
        if fm.fileExists(atPath: configPath(path)) {
            throw CairnError(.usage, "a repository already exists here", path: path)
        }
        if let contents = try? fm.contentsOfDirectory(atPath: path), !contents.isEmpty {
            throw CairnError(.usage, "directory is not empty", path: path, hint: "choose a new or empty directory")
        }
        do {
            try fm.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw CairnError(.io, "cannot create repository directory: \(error.localizedDescription)", path: path)
        }
        var idBytes = [UInt8](repeating: 0, count: 32)
        var rng = SystemRandomNumberGenerator()
        for i in idBytes.indices { idBytes[i] = UInt8.random(in: 0...255, using: &rng) }
        let config = RepositoryConfig(id: hexString(idBytes), chunkSize: chunkSize, compressionLevel: compressionLevel, encryption: encryption)
        let store = RetryingStore(LocalDirectoryStore(root: path))
        for ns in ["chunks", "indexes", "snapshots", "keys", "locks", "tmp"] {
            if mkdir("\(path)/\(ns)", 0o755) != 0 && errno != EEXIST { throw CairnError.errno("mkdir", errno, path: "\(path)/\(ns)") }
        }
        var keys: MasterKeys?
        if encryption == .aes256gcm {
            guard let passphrase, !passphrase.isEmpty else {
                throw CairnError(.usage, "an encrypted repository needs a password", hint: "set CAIRN_PASSWORD, use --password-file, or run on a terminal to be asked")
            }
            let k = MasterKeys.generate()
            let keyFile = try KeyFile.create(keys: k, passphrase: passphrase, n: scryptN, host: hostName(), created: timestamp())
            let data = try JSONEncoder().encode(keyFile)
            let keyID = hexString(Array(SHA256Hex.hash(Array(data)).prefix(16)))
            try store.put(ObjectKey("keys", keyID), [UInt8](data))
            keys = k
        }
        // The config is written last: a directory without it is not a repository.
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try store.put(ObjectKey("", "config"), [UInt8](try enc.encode(config)))
        try store.barrier()
        try fsyncDirectory(path)
        return Repository(config: config, keys: keys, store: store)
    }

    /// Reads the config without unlocking (to know whether a password is needed).
    package static func readConfig(path: String) throws -> RepositoryConfig {
        let p = configPath(path)
        guard let data = FileManager.default.contents(atPath: p) else {
            throw CairnError(.repositoryNotFound, "no Cairn repository here (config missing)", path: path,
                             hint: "create one with `cairn init` or set CAIRN_REPO / --repo to an existing one")
        }
        let config: RepositoryConfig
        do {
            config = try JSONDecoder().decode(RepositoryConfig.self, from: data)
        } catch {
            throw CairnError(.corrupt, "config is not valid: \(error)", path: p)
        }
        try config.validate(path: p)
        return config
    }

    /// Opens a repository; `passphrase` is asked for only when it is encrypted.
    /// `store` replaces the local directory store (tests wrap it to inject faults).
    package static func open(path: String, store: (any ObjectStore)? = nil, lockWait: TimeInterval = 0,
                             passphrase: () throws -> String?) throws -> Repository {
        let config = try readConfig(path: path)
        let store = RetryingStore(store ?? LocalDirectoryStore(root: path))
        var keys: MasterKeys?
        if config.encryptionAlgorithm == .aes256gcm {
            guard let pass = try passphrase(), !pass.isEmpty else {
                throw CairnError(.wrongPassword, "the repository is encrypted and no password was given",
                                 hint: "set CAIRN_PASSWORD, use --password-file, or run on a terminal to be asked")
            }
            let names = try store.list("keys")
            guard !names.isEmpty else { throw CairnError(.corrupt, "encrypted repository has no key files", path: "\(path)/keys") }
            var lastError: CairnError?
            for name in names.sorted() {
                let data = try store.get(ObjectKey("keys", name))
                let keyFile: KeyFile
                do {
                    keyFile = try JSONDecoder().decode(KeyFile.self, from: Data(data))
                } catch {
                    lastError = CairnError(.corrupt, "key file is not valid JSON", path: "\(path)/keys/\(name)")
                    continue
                }
                do {
                    keys = try keyFile.unlock(passphrase: pass)
                    break
                } catch let e as CairnError {
                    lastError = e
                }
            }
            guard keys != nil else {
                throw lastError ?? CairnError(.wrongPassword, "wrong password")
            }
        }
        return Repository(config: config, keys: keys, store: store, lockWait: lockWait)
    }
}

/// Small helpers for times written into repository files (`hostName()` is in Storage).
package func timestamp(_ date: Date = Date()) -> String {
    Timestamp.format(secondsSince1970: date.timeIntervalSince1970)
}

package func parseTimestamp(_ s: String) -> Date? {
    Timestamp.parse(s).map { Date(timeIntervalSince1970: $0) }
}

/// SHA-256 for key-file names (not secret).
enum SHA256Hex {
    static func hash(_ bytes: [UInt8]) -> [UInt8] {
        ObjectCodec(keys: nil, compressionLevel: 1).id(of: bytes).bytes
    }
}
