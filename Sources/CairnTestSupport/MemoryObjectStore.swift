import CairnCore
import Storage
import Synchronization

/// An `ObjectStore` in memory, for unit tests of logic above the storage layer.
///
/// Keeps the contract as `LocalDirectoryStore` does: puts are atomic and visible at once,
/// `get` of a missing object throws `.notFound`, `delete` of a missing object succeeds,
/// `list` of an unknown namespace is empty. `barrier` does nothing (memory has no names to
/// make durable). Thread safe.
package final class MemoryObjectStore: ObjectStore {
    package let location: String
    private let objects = Mutex<[String: [String: [UInt8]]]>([:])

    package init(location: String = "memory") {
        self.location = location
    }

    package func put(_ key: ObjectKey, _ bytes: UnsafeRawBufferPointer) throws {
        let copy = [UInt8](bytes)
        objects.withLock { $0[key.namespace, default: [:]][key.name] = copy }
    }

    private func missing(_ key: ObjectKey) -> CairnError {
        CairnError(.notFound, "\(key.namespace) object \(key.name) is missing", path: path(for: key))
    }

    package func get(_ key: ObjectKey) throws -> [UInt8] {
        guard let bytes = objects.withLock({ $0[key.namespace]?[key.name] }) else { throw missing(key) }
        return bytes
    }

    package func get(_ key: ObjectKey, into buffer: inout UnsafeMutableRawBufferPointer) throws -> Int {
        let bytes = try get(key)
        if buffer.count < bytes.count {
            buffer.deallocate()
            buffer = .allocate(byteCount: bytes.count, alignment: 16)
        }
        bytes.withUnsafeBytes { src in
            if let base = src.baseAddress, src.count > 0 {
                buffer.baseAddress!.copyMemory(from: base, byteCount: src.count)
            }
        }
        return bytes.count
    }

    package func exists(_ key: ObjectKey) throws -> Bool {
        objects.withLock { $0[key.namespace]?[key.name] != nil }
    }

    package func size(_ key: ObjectKey) throws -> UInt64? {
        objects.withLock { $0[key.namespace]?[key.name].map { UInt64($0.count) } }
    }

    package func list(_ namespace: String) throws -> [String] {
        objects.withLock { $0[namespace].map { Array($0.keys) } ?? [] }
    }

    package func delete(_ key: ObjectKey) throws {
        objects.withLock { _ = $0[key.namespace]?.removeValue(forKey: key.name) }
    }

    package func barrier() throws {}

    // MARK: Test helpers

    /// Number of objects in every namespace.
    package var objectCount: Int { objects.withLock { $0.values.reduce(0) { $0 + $1.count } } }

    /// Total bytes stored.
    package var totalBytes: Int {
        objects.withLock { $0.values.reduce(0) { $0 + $1.values.reduce(0) { $0 + $1.count } } }
    }

    /// Replaces an object's bytes behind the contract's back (to simulate corruption at rest).
    package func overwrite(_ key: ObjectKey, with bytes: [UInt8]) {
        objects.withLock { $0[key.namespace, default: [:]][key.name] = bytes }
    }
}
