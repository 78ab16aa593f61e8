import CairnCore

extension XFSFileSystem {
    /// Log record header magic (`XLOG_HEADER_MAGIC_NUM`).
    static let logRecordMagic: UInt32 = 0xFEED_BABE
    /// Most 512-byte log blocks searched backwards from the head for the last record header
    /// (a record is at most 256 KiB of data plus its headers).
    static let maxLogRecordSearch: UInt64 = 1024

    /// True when the internal log ends with an unmount record, so every committed change is in
    /// the metadata on disk. A live or crashed file system has a dirty log: its free-space
    /// trees may predate allocations committed only to the log, so `freeRanges` then reports
    /// nothing. Anything unexpected (external log, odd cycle numbers, no record before the head)
    /// counts as dirty.
    ///
    /// The log is a ring of 512-byte blocks. Every block's first word is the cycle number of
    /// the pass that wrote it, except record headers, which start with the magic 0xFEEDBABE and
    /// hold the cycle at 4. The head (where the next record goes) is the first block whose
    /// cycle is lower than block 0's. Record header fields used: magic (0), cycle (4), version
    /// (8), data length (12), number of log operations (40), header size for v2 logs (320).
    /// The record just before the head must be exactly one operation whose header (after the
    /// record header blocks) has the unmount flag (0x20 at byte 9), and must end at the head.
    func logIsClean() throws -> Bool {
        guard sb.logStart != 0, sb.logBlocks > 0,
              let linear = sb.linearBlock(sb.logStart, count: UInt64(sb.logBlocks)) else { return false }
        let base = linear * UInt64(sb.blockSize)
        let blocks = UInt64(sb.logBlocks) * UInt64(sb.blockSize) / 512
        guard blocks >= 2 else { return false }
        func block(_ n: UInt64) throws -> CheckedBytes {
            CheckedBytes(try volume.readBytes(at: base + (n % blocks) * 512, count: 512), order: .big)
        }
        func cycle(_ n: UInt64) throws -> UInt32 {
            let b = try block(n)
            let first = b.u32(at: 0) ?? 0
            return first == Self.logRecordMagic ? (b.u32(at: 4) ?? 0) : first
        }
        let firstCycle = try cycle(0), lastCycle = try cycle(blocks - 1)
        var head: UInt64
        if firstCycle == lastCycle {
            head = 0  // one pass fills the whole ring: the head wraps to the start
        } else {
            guard lastCycle &+ 1 == firstCycle else { return false }
            // Binary search for the first block of the older pass.
            var lo: UInt64 = 0, hi = blocks - 1
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2
                if try cycle(mid) == lastCycle { hi = mid } else { lo = mid }
            }
            head = hi
        }
        // The last record header before the head.
        var n: UInt64 = 1
        while n <= min(Self.maxLogRecordSearch, blocks) {
            let at = (head + blocks - n) % blocks
            let h = try block(at)
            if h.u32(at: 0) == Self.logRecordMagic {
                let version = h.u32(at: 8) ?? 0, length = UInt64(h.u32(at: 12) ?? 0), size = UInt64(h.u32(at: 320) ?? 0)
                let headerBlocks: UInt64 = version & 2 != 0 && size > 32768 ? (size + 32767) / 32768 : 1
                let after = (at + headerBlocks + (length + 511) / 512) % blocks
                guard after == head % blocks, h.u32(at: 40) == 1, length >= 12 else { return false }
                let op = try block(at + headerBlocks)
                return (op.u8(at: 9) ?? 0) & 0x20 != 0
            }
            n += 1
        }
        return false
    }
}
