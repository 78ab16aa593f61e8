/// Big-endian reads from a byte array that return nil instead of trapping when the array is
/// too short: every index that comes from a file is checked here.
struct BigEndianBytes {
    let bytes: [UInt8]

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var count: Int { bytes.count }

    func u8(at offset: Int) -> UInt8? {
        guard offset >= 0, offset < bytes.count else { return nil }
        return bytes[offset]
    }

    func u32(at offset: Int) -> UInt32? {
        guard let raw = fixedWidth(at: offset, as: UInt32.self) else { return nil }
        return UInt32(bigEndian: raw)
    }

    func u64(at offset: Int) -> UInt64? {
        guard let raw = fixedWidth(at: offset, as: UInt64.self) else { return nil }
        return UInt64(bigEndian: raw)
    }

    /// `count` bytes at `offset`, or nil when they are not all there.
    func slice(at offset: Int, count: Int) -> ArraySlice<UInt8>? {
        guard offset >= 0, count >= 0, offset <= bytes.count, count <= bytes.count - offset else { return nil }
        return bytes[offset..<offset + count]
    }

    private func fixedWidth<T: FixedWidthInteger>(at offset: Int, as: T.Type) -> T? {
        let width = MemoryLayout<T>.size
        guard offset >= 0, offset <= bytes.count, width <= bytes.count - offset else { return nil }
        return bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) }
    }
}

extension UnsafeMutableRawBufferPointer {
    /// Stores `value` big-endian at `offset` (the caller sized the buffer).
    @inline(__always)
    func storeBigEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self)
    }
}
