import CairnCore

/// Standard CRC-32 (ISO-HDLC / zlib / GPT: reflected polynomial 0xEDB88320, initial value and
/// final XOR 0xFFFFFFFF), table driven.
enum CRC32 {
    static let table: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = (c & 1) != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    static func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }
}

/// Text form of a 16-byte GUID as stored on disk (GPT, Microsoft "mixed endian"): the first
/// three fields little-endian, the last two big-endian; canonical lowercase.
func guidString(_ bytes: some Collection<UInt8>) -> String {
    let b = Array(bytes)
    guard b.count == 16 else { return "" }
    func h(_ x: UInt8) -> String {
        let digits: [Character] = Array("0123456789abcdef")
        return String([digits[Int(x >> 4)], digits[Int(x & 0xF)]])
    }
    let order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15]
    return order.map { $0 < 0 ? "-" : h(b[$0]) }.joined()
}

/// `a * b` or nil on overflow.
func mul(_ a: UInt64, _ b: UInt64) -> UInt64? {
    let r = a.multipliedReportingOverflow(by: b)
    return r.overflow ? nil : r.partialValue
}

/// `a + b` or nil on overflow.
func add(_ a: UInt64, _ b: UInt64) -> UInt64? {
    let r = a.addingReportingOverflow(b)
    return r.overflow ? nil : r.partialValue
}
