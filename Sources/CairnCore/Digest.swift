/// A 32-byte digest: a chunk id (SHA-256 or HMAC-SHA256 of the plaintext), an index id or a
/// snapshot id. Stored as four words so that hashing and comparing cost no allocations.
public struct Digest: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

    public static let byteCount = 32
    /// The reserved all-zero value. Index entries use it to mean "an all-zero chunk".
    public static let zero = Digest(w0: 0, w1: 0, w2: 0, w3: 0)

    public init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) {
        self.w0 = w0; self.w1 = w1; self.w2 = w2; self.w3 = w3
    }

    /// From exactly 32 bytes in order (big-endian words, so hex and comparisons follow bytes).
    public init(bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count == 32, "a digest has 32 bytes")
        func word(_ i: Int) -> UInt64 { UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        self.init(w0: word(0), w1: word(1), w2: word(2), w3: word(3))
    }

    public init<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        let a = Array(bytes)
        precondition(a.count == 32, "a digest has 32 bytes")
        self = a.withUnsafeBytes { Digest(bytes: $0) }
    }

    /// Parses 64 hex digits; nil for anything else.
    public init?(hex: some StringProtocol) {
        let u = Array(hex.utf8)
        guard u.count == 64 else { return nil }
        var bytes = [UInt8](repeating: 0, count: 32)
        for i in 0..<32 {
            guard let hi = hexValue(u[2 * i]), let lo = hexValue(u[2 * i + 1]) else { return nil }
            bytes[i] = hi << 4 | lo
        }
        self.init(bytes)
    }

    public var isZero: Bool { (w0 | w1 | w2 | w3) == 0 }

    /// Writes the 32 bytes to `out` (which must hold 32 bytes).
    public func store(to out: UnsafeMutableRawBufferPointer) {
        precondition(out.count >= 32)
        out.storeBytes(of: w0.bigEndian, toByteOffset: 0, as: UInt64.self)
        out.storeBytes(of: w1.bigEndian, toByteOffset: 8, as: UInt64.self)
        out.storeBytes(of: w2.bigEndian, toByteOffset: 16, as: UInt64.self)
        out.storeBytes(of: w3.bigEndian, toByteOffset: 24, as: UInt64.self)
    }

    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        out.withUnsafeMutableBytes { store(to: $0) }
        return out
    }

    public var hex: String {
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        var chars = [UInt8]()
        chars.reserveCapacity(64)
        for b in bytes {
            chars.append(digits[Int(b >> 4)])
            chars.append(digits[Int(b & 15)])
        }
        return String(decoding: chars, as: UTF8.self)
    }

    /// The first 8 hex digits, as shown in listings.
    public var short: String { String(hex.prefix(8)) }

    public var description: String { hex }

    public static func < (a: Digest, b: Digest) -> Bool {
        (a.w0, a.w1, a.w2, a.w3) < (b.w0, b.w1, b.w2, b.w3)
    }
}

@inline(__always)
private func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
    default: nil
    }
}

/// Lowercase hex of arbitrary bytes.
public func hexString<C: Sequence>(_ bytes: C) -> String where C.Element == UInt8 {
    let digits: [UInt8] = Array("0123456789abcdef".utf8)
    var chars = [UInt8]()
    for b in bytes {
        chars.append(digits[Int(b >> 4)])
        chars.append(digits[Int(b & 15)])
    }
    return String(decoding: chars, as: UTF8.self)
}
