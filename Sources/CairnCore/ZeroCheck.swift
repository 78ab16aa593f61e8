/// Whether a buffer holds only zero bytes. Runs at memory speed (word-wise OR with early exit).
@inline(__always)
public func isAllZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
    guard let base = buffer.baseAddress else { return true }
    let n = buffer.count
    var i = 0
    // Unaligned prefix.
    while i < n, (Int(bitPattern: base) + i) & 7 != 0 {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    // 64 bytes per step; a non-zero chunk exits in the first block.
    while i + 64 <= n {
        let p = (base + i).assumingMemoryBound(to: UInt64.self)
        if (p[0] | p[1] | p[2] | p[3] | p[4] | p[5] | p[6] | p[7]) != 0 { return false }
        i += 64
    }
    while i + 8 <= n {
        if base.load(fromByteOffset: i, as: UInt64.self) != 0 { return false }
        i += 8
    }
    while i < n {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    return true
}
