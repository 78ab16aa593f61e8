/// Fixed-width integer reads from a byte array that return nil instead of trapping when the
/// field does not fit: every parser of untrusted bytes (image headers, partition tables) reads
/// its fields through this, in the byte order its format uses.
public struct CheckedBytes: Sendable {
    public enum Order: Sendable { case little, big }

    public let bytes: [UInt8]
    public let order: Order

    public init(_ bytes: [UInt8], order: Order = .little) {
        self.bytes = bytes
        self.order = order
    }

    public var count: Int { bytes.count }

    public func u8(at offset: Int) -> UInt8? {
        guard offset >= 0, offset < bytes.count else { return nil }
        return bytes[offset]
    }

    public func u16(at offset: Int) -> UInt16? { value(at: offset) }
    public func u32(at offset: Int) -> UInt32? { value(at: offset) }
    public func u64(at offset: Int) -> UInt64? { value(at: offset) }

    /// `count` bytes at `offset`, or nil when they are not all there.
    public func slice(at offset: Int, count: Int) -> ArraySlice<UInt8>? {
        guard offset >= 0, count >= 0, offset <= bytes.count, count <= bytes.count - offset else { return nil }
        return bytes[offset..<offset + count]
    }

    private func value<T: FixedWidthInteger>(at offset: Int) -> T? {
        let width = MemoryLayout<T>.size
        guard offset >= 0, offset <= bytes.count, width <= bytes.count - offset else { return nil }
        let raw = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) }
        return order == .little ? T(littleEndian: raw) : T(bigEndian: raw)
    }
}

extension UnsafeMutableRawBufferPointer {
    /// Stores `value` little-endian at `offset` (the caller sized the buffer).
    @inline(__always)
    public func storeLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }

    /// Stores `value` big-endian at `offset` (the caller sized the buffer).
    @inline(__always)
    public func storeBigEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self)
    }
}
