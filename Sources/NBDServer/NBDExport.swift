import CairnCore

/// A disk an NBD client may write: the copy-on-write overlay of an instant restore, or a
/// scratch device in tests. Reads go through the `BlockSource` side.
package protocol NBDWritableDevice: BlockSource {
    /// Writes `bytes` at `offset` (inside `size`).
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes `[offset, offset + length)` read as zeros.
    func writeZeroes(at offset: UInt64, length: UInt64) throws
    /// The client no longer needs the range; it may read as zeros or keep its data afterwards.
    func trim(at offset: UInt64, length: UInt64) throws
    /// Makes every completed write durable.
    func flush() throws
}

/// One export of an NBD server: a name clients ask for, and the disk behind it.
package struct NBDExport: Sendable {
    package var name: String
    package var description: String
    package var source: any BlockSource
    /// Set for a writable export (its reads must go through it too: it is the merged view).
    package var writable: (any NBDWritableDevice)?

    package init(name: String, description: String = "", source: any BlockSource, writable: (any NBDWritableDevice)? = nil) {
        self.name = name
        self.description = description
        self.source = writable ?? source
        self.writable = writable
    }
}
