/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) as VHDX (headers, region tables, log entries),
/// ext4 and XFS (metadata checksums) use. Slicing-by-8: eight table lookups per 8 input bytes, so a 64 KiB
/// region table costs 8 K loop turns instead of 64 K (it dominated the VHDX fuzz target).
public enum CRC32C {
    /// tables[k][n]: the CRC of byte n followed by k zero bytes; tables[0] is the classic table.
    public static let tables: [[UInt32]] = {
        var t = [[UInt32]](repeating: [UInt32](repeating: 0, count: 256), count: 8)
        for n in 0..<256 {
            var c = UInt32(n)
            for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[0][n] = c
        }
        for k in 1..<8 {
            for n in 0..<256 { t[k][n] = (t[k - 1][n] >> 8) ^ t[0][Int(t[k - 1][n] & 0xFF)] }
        }
        return t
    }()
    /// The eight tables back to back, 256 entries each.
    private static let flat: [UInt32] = tables.flatMap { $0 }

    /// False only in the fuzz build (fuzz/build.sh defines CAIRN_FUZZING): there a mutated
    /// header or table would almost always fail its checksum, so the fuzzer would never
    /// get past it, and the 64 KiB VHDX region table checksum was most of each run's time under
    /// coverage instrumentation. Unit tests cover the mismatch paths.
    #if CAIRN_FUZZING
    public static let enforced = false
    #else
    public static let enforced = true
    #endif

    public static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        ~bytes.withUnsafeBytes { update(0xFFFF_FFFF, $0) }
    }

    /// The checksum of a structure whose 4-byte checksum field at `field` counts as zero.
    public static func checksum(_ bytes: [UInt8], zeroingFieldAt field: Int) -> UInt32 {
        bytes.withUnsafeBytes { raw -> UInt32 in
            let cut = min(max(field, 0), raw.count)
            let resume = min(cut + 4, raw.count)
            var crc = update(0xFFFF_FFFF, UnsafeRawBufferPointer(rebasing: raw[0..<cut]))
            let zeros: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
            crc = withUnsafeBytes(of: zeros) { update(crc, UnsafeRawBufferPointer(rebasing: $0[0..<(resume - cut)])) }
            crc = update(crc, UnsafeRawBufferPointer(rebasing: raw[resume...]))
            return ~crc
        }
    }

    /// The raw register update: no inversion on entry or exit (Linux's `crc32c(seed, data)`,
    /// which ext4 and XFS chain with their own seeds). `checksum` is `~update(~0, data)`.
    public static func update(_ start: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var crc = start
        flat.withUnsafeBufferPointer { t in
            var i = 0
            let n = bytes.count
            while n - i >= 8 {
                let lo = crc ^ bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self).littleEndian
                let hi = bytes.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self).littleEndian
                crc = t[7 * 256 + Int(lo & 0xFF)] ^ t[6 * 256 + Int((lo >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((lo >> 16) & 0xFF)] ^ t[4 * 256 + Int(lo >> 24)]
                    ^ t[3 * 256 + Int(hi & 0xFF)] ^ t[2 * 256 + Int((hi >> 8) & 0xFF)]
                    ^ t[1 * 256 + Int((hi >> 16) & 0xFF)] ^ t[Int(hi >> 24)]
                i += 8
            }
            while i < n {
                crc = t[Int((crc ^ UInt32(bytes[i])) & 0xFF)] ^ (crc >> 8)
                i += 1
            }
        }
        return crc
    }

    /// `update` over an array slice.
    public static func update(_ start: UInt32, _ bytes: ArraySlice<UInt8>) -> UInt32 {
        bytes.withUnsafeBytes { update(start, $0) }
    }
}
