import Crypto
import CairnCore

/// The repository's secret keys: one for AES-256-GCM, one for chunk ids (HMAC-SHA256), so the
/// ids of encrypted chunks do not reveal the SHA-256 of guest data.
package struct MasterKeys: Sendable {
    package let encryption: SymmetricKey
    package let id: SymmetricKey

    package init(encryption: SymmetricKey, id: SymmetricKey) {
        self.encryption = encryption
        self.id = id
    }

    package static func generate() -> MasterKeys {
        MasterKeys(encryption: SymmetricKey(size: .bits256), id: SymmetricKey(size: .bits256))
    }

    /// 64 bytes: encryption key then id key (the plaintext wrapped by a key file).
    package var material: [UInt8] {
        var out = [UInt8]()
        encryption.withUnsafeBytes { out.append(contentsOf: $0) }
        id.withUnsafeBytes { out.append(contentsOf: $0) }
        return out
    }

    package init(material: [UInt8]) throws {
        guard material.count == 64 else { throw CairnError(.corrupt, "key material has \(material.count) bytes, expected 64") }
        self.init(encryption: SymmetricKey(data: material[0..<32]), id: SymmetricKey(data: material[32..<64]))
    }
}
