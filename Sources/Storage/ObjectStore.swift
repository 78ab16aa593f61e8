import CairnCore

/// Where an object lives in a store: a namespace ("chunks", "indexes", "snapshots", "keys",
/// "locks") and a name (usually 64 hex digits).
package struct ObjectKey: Hashable, Sendable, CustomStringConvertible {
    package var namespace: String
    package var name: String

    package init(_ namespace: String, _ name: String) {
        self.namespace = namespace
        self.name = name
    }

    package var description: String { "\(namespace)/\(name)" }
}

/// The storage contract every backend keeps (docs/FORMAT.md, "Storage contract"):
///
/// - `put` is atomic: a reader sees the whole object or nothing, never a prefix.
/// - After the next `barrier()`, the object's bytes and name are durable (a local directory
///   makes data durable before the name exists, per file or per group of chunk files, and
///   batches directory fsyncs at the barrier; object stores do nothing).
/// - A name never exists before its data is durable: a crash leaves whole objects or none.
/// - Read-after-write: `get`/`exists`/`list` of the same process see an object once `put`
///   returned; other processes see it after the next `barrier()` at the latest.
/// - Objects are write-once: a `put` of an existing key replaces it with identical bytes only
///   (content addressing); nothing is ever modified in place.
package protocol ObjectStore: Sendable {
    /// A human name of the store (a path or URL) for messages.
    var location: String { get }
    func put(_ key: ObjectKey, _ bytes: UnsafeRawBufferPointer) throws
    /// Reads a whole object; throws `.notFound` when it does not exist.
    func get(_ key: ObjectKey) throws -> [UInt8]
    /// Reads a whole object into `buffer` (reallocated when too small); returns its length.
    func get(_ key: ObjectKey, into buffer: inout UnsafeMutableRawBufferPointer) throws -> Int
    func exists(_ key: ObjectKey) throws -> Bool
    func size(_ key: ObjectKey) throws -> UInt64?
    /// Names in a namespace, in no particular order.
    func list(_ namespace: String) throws -> [String]
    func delete(_ key: ObjectKey) throws
    /// Makes every object put so far, bytes and name, durable.
    func barrier() throws
    /// Where `key` lives, for messages (a file path, a URL).
    func path(for key: ObjectKey) -> String
    /// Names this process's temporary files after its lock id, so that a later process can
    /// tell a dead writer's leftovers (stores without temporaries ignore it).
    func setTemporaryOwner(_ owner: String)
    /// Removes temporaries of writers not in `liveOwners`; returns how many were removed.
    func removeStaleTemporaries(liveOwners: () throws -> Set<String>) throws -> Int
    /// A hint that `key` will be read soon (a local store starts reading it into the page
    /// cache). Never fails; a store may ignore it.
    func prefetch(_ key: ObjectKey)
}

extension ObjectStore {
    package func path(for key: ObjectKey) -> String { "\(location)/\(key)" }
    package func setTemporaryOwner(_ owner: String) {}
    package func removeStaleTemporaries(liveOwners: () throws -> Set<String>) throws -> Int { 0 }
    package func prefetch(_ key: ObjectKey) {}

    package func put(_ key: ObjectKey, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try put(key, $0) }
    }
}
