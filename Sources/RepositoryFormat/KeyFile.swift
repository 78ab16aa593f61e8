import Crypto
import CryptoExtras
import CairnCore
import Foundation

/// A key file (`keys/<id>`): the master keys wrapped with a key derived from a passphrase.
///
/// JSON, specified in docs/FORMAT.md. The wrapping key is scrypt(passphrase, salt, N, r, p);
/// the master key material is sealed with AES-256-GCM under it, with the string
/// "cairn key v1" as associated data. A wrong passphrase fails authentication.
package struct KeyFile: Codable, Sendable {
    package var version: Int
    package var kdf: String
    package var n: Int
    package var r: Int
    package var p: Int
    package var salt: String
    /// nonce (12) || ciphertext (64) || tag (16), base64.
    package var wrapped: String
    package var created: String
    package var host: String

    static let associatedData = Array("cairn key v1".utf8)

    /// Default scrypt cost: N = 2^15, r = 8, p = 1 (32 MiB, about 0.1 s here).
    package static let defaultN = 1 << 15

    package static func create(keys: MasterKeys, passphrase: String, n: Int = defaultN, host: String, created: String) throws -> KeyFile {
        var salt = [UInt8](repeating: 0, count: 32)
        var rng = SystemRandomNumberGenerator()
        for i in salt.indices { salt[i] = UInt8.random(in: 0...255, using: &rng) }
        let kek = try derive(passphrase: passphrase, salt: salt, n: n, r: 8, p: 1)
        let box = try AES.GCM.seal(keys.material, using: kek, authenticating: associatedData)
        guard let combined = box.combined else { throw CairnError(.io, "AES-GCM produced no combined box") }
        return KeyFile(version: 1, kdf: "scrypt", n: n, r: 8, p: 1, salt: Data(salt).base64EncodedString(),
                       wrapped: combined.base64EncodedString(), created: created, host: host)
    }

    /// Opens the key with `passphrase`; throws `.wrongPassword` when authentication fails.
    package func unlock(passphrase: String) throws -> MasterKeys {
        guard version == 1, kdf == "scrypt" else {
            throw CairnError(.unsupported, "key file version \(version) with kdf \(kdf) is not supported by this cairn")
        }
        guard n >= 2, n <= 1 << 22, n & (n - 1) == 0, r >= 1, r <= 64, p >= 1, p <= 16 else {
            throw CairnError(.corrupt, "key file has out-of-range scrypt parameters N=\(n) r=\(r) p=\(p)")
        }
        guard let salt = Data(base64Encoded: self.salt), let wrapped = Data(base64Encoded: self.wrapped) else {
            throw CairnError(.corrupt, "key file is not valid base64")
        }
        let kek = try KeyFile.derive(passphrase: passphrase, salt: [UInt8](salt), n: n, r: r, p: p)
        let material: Data
        do {
            let box = try AES.GCM.SealedBox(combined: wrapped)
            material = try AES.GCM.open(box, using: kek, authenticating: KeyFile.associatedData)
        } catch {
            throw CairnError(.wrongPassword, "wrong password: no key of the repository opens with it")
        }
        return try MasterKeys(material: [UInt8](material))
    }

    static func derive(passphrase: String, salt: [UInt8], n: Int, r: Int, p: Int) throws -> SymmetricKey {
        try KDF.Scrypt.deriveKey(from: Array(passphrase.utf8), salt: salt, outputByteCount: 32,
                                 rounds: n, blockSize: r, parallelism: p, maxMemory: 1 << 30)
    }
}
