import CairnCore

/// One mapping of a file's blocks: `count` blocks at file block `logical` live at volume
/// block `physical` (linear, from the start of the volume). Unwritten extents read as zeros.
struct XFSExtent: Sendable, Equatable {
    var logical: UInt64
    var physical: UInt64
    var count: UInt64
    var unwritten: Bool

    var logicalEnd: UInt64 { logical + count }
}

/// A parsed inode with its data fork's block map (empty for local and device forks).
struct XFSFileMap: Sendable {
    var inode: XFSInode
    var extents: [XFSExtent]

    /// Index of the extent containing file block `block`, or of the first one after it
    /// (`extents.count` when none).
    func firstExtent(atOrAfter block: UInt64) -> Int {
        var lo = 0, hi = extents.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if extents[mid].logicalEnd <= block { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }
}

extension XFSFileSystem {
    /// Decodes one packed 128-bit extent record (`xfs_bmbt_rec`, two big-endian u64 words):
    /// bit 127 unwritten flag, bits 73-126 file offset (54 bits), bits 21-72 start block (52
    /// bits, agno << agblklog | agbno), bits 0-20 block count (21 bits).
    func decodeExtent(_ b: CheckedBytes, at offset: Int, ino: UInt64, where location: UInt64) throws -> XFSExtent {
        guard let l0 = b.u64(at: offset), let l1 = b.u64(at: offset + 8) else {
            throw damaged("extent record of inode \(ino) is truncated", at: location)
        }
        let unwritten = l0 >> 63 != 0
        let logical = (l0 & 0x7FFF_FFFF_FFFF_FFFF) >> 9
        let fsb = ((l0 & 0x1FF) << 43) | (l1 >> 21)
        let count = l1 & 0x1F_FFFF
        guard count > 0 else { throw damaged("extent record of inode \(ino) has zero length", at: location) }
        guard let physical = sb.linearBlock(fsb, count: count) else {
            throw damaged("extent of inode \(ino) (block \(fsb), \(count) blocks) lies outside its AG or the file system", at: location)
        }
        return XFSExtent(logical: logical, physical: physical, count: count, unwritten: unwritten)
    }

    /// Appends `e` to `list`, checking that file offsets ascend without overlap.
    func append(_ e: XFSExtent, to list: inout [XFSExtent], ino: UInt64, at location: UInt64) throws {
        if let last = list.last, e.logical < last.logicalEnd {
            throw damaged("extents of inode \(ino) overlap or are out of order (file block \(e.logical) after \(last.logicalEnd))", at: location)
        }
        guard e.logicalEnd <= UInt64(Int64.max) >> UInt64(sb.blockLog) else {
            throw damaged("extent of inode \(ino) ends at file block \(e.logicalEnd), past the largest file XFS allows", at: location)
        }
        guard list.count < XFSLimits.maxExtents else {
            throw CairnError(.unsupported, "inode \(ino) has more than \(XFSLimits.maxExtents) extents", path: volume.name, offset: location)
        }
        list.append(e)
    }

    /// The block map of `inode`'s data fork: the extent list of an extents-format fork, or the
    /// leaves of a block-map B+tree whose root lives in the fork.
    func blockMap(of inode: XFSInode) throws -> [XFSExtent] {
        let fork = CheckedBytes(inode.dataFork, order: .big)
        let forkAt = inode.offset + UInt64(sb.hasCRC ? 176 : 100)
        var out: [XFSExtent] = []
        switch inode.format {
        case .extents:
            guard inode.extentCount <= UInt64(inode.dataFork.count / 16) else {
                throw damaged("inode \(inode.number) claims \(inode.extentCount) extents; its data fork holds at most \(inode.dataFork.count / 16)",
                              at: inode.offset + 76)
            }
            for i in 0..<Int(inode.extentCount) {
                let e = try decodeExtent(fork, at: i * 16, ino: inode.number, where: forkAt + UInt64(i * 16))
                try append(e, to: &out, ino: inode.number, at: forkAt + UInt64(i * 16))
            }
        case .btree:
            // Root (xfs_bmdr_block): level (0, u16), record count (2, u16), then as many keys
            // (u64 file offsets) as the fork could hold, then as many u64 block pointers.
            let level = Int(fork.u16(at: 0) ?? 0), count = Int(fork.u16(at: 2) ?? 0)
            let maxRecords = (inode.dataFork.count - 4) / 16
            guard level >= 1, level <= XFSLimits.maxTreeDepth, count >= 1, count <= maxRecords else {
                throw damaged("block-map root of inode \(inode.number) has level \(level) and \(count) records (at most \(maxRecords))", at: forkAt)
            }
            var visited: Set<UInt64> = []
            for i in 0..<count {
                let pointerAt = 4 + maxRecords * 8 + i * 8
                guard let child = fork.u64(at: pointerAt) else { throw damaged("block-map root of inode \(inode.number) is truncated", at: forkAt) }
                try walkBlockMap(child, level: level - 1, inode: inode.number, visited: &visited, into: &out)
            }
        case .local, .device:
            break
        }
        return out
    }

    /// Reads block-map B+tree block `fsb` (expected at `level`) and appends its extents.
    /// Long-format block header: magic (0), level (4, u16), record count (6, u16), left and right
    /// siblings (8, 16); v5 adds block number in 512-byte units (24), LSN (32), UUID (40), owner
    /// inode (56), CRC (64, little-endian). Records start at 72 (v5) or 24 (v4).
    private func walkBlockMap(_ fsb: UInt64, level: Int, inode ino: UInt64, visited: inout Set<UInt64>, into out: inout [XFSExtent]) throws {
        guard let linear = sb.linearBlock(fsb, count: 1) else {
            throw damaged("block-map B+tree of inode \(ino) points to block \(fsb) outside the file system", at: nil)
        }
        let at = linear * UInt64(sb.blockSize)
        guard visited.insert(linear).inserted else {
            throw damaged("block-map B+tree of inode \(ino) reaches block \(fsb) twice (a loop or cross-link)", at: at)
        }
        let raw = try volume.readBytes(at: at, count: sb.blockSize)
        let b = CheckedBytes(raw, order: .big)
        let header = sb.hasCRC ? 72 : 24
        guard b.u32(at: 0) == (sb.hasCRC ? XFSMagic.bmbtV5 : XFSMagic.bmbtV4) else {
            throw damaged("block-map B+tree block of inode \(ino) has no valid magic", at: at)
        }
        if sb.hasCRC {
            try verifyCRC(raw, field: 64, what: "block-map B+tree block of inode \(ino)", at: at)
            try checkHeader(b, blkno: 24, uuid: 40, owner: (56, ino), what: "block-map B+tree block of inode \(ino)", linear: linear)
        }
        let blockLevel = Int(b.u16(at: 4) ?? 0), count = Int(b.u16(at: 6) ?? 0)
        let maxRecords = (sb.blockSize - header) / 16
        guard blockLevel == level else {
            throw damaged("block-map B+tree block of inode \(ino) has level \(blockLevel), expected \(level)", at: at + 4)
        }
        guard count >= 1, count <= maxRecords else {
            throw damaged("block-map B+tree block of inode \(ino) has \(count) records (at most \(maxRecords))", at: at + 6)
        }
        if level == 0 {
            for i in 0..<count {
                let e = try decodeExtent(b, at: header + i * 16, ino: ino, where: at + UInt64(header + i * 16))
                try append(e, to: &out, ino: ino, at: at + UInt64(header + i * 16))
            }
            return
        }
        for i in 0..<count {
            guard let child = b.u64(at: header + maxRecords * 8 + i * 8) else { throw damaged("block-map B+tree block is truncated", at: at) }
            try walkBlockMap(child, level: level - 1, inode: ino, visited: &visited, into: &out)
        }
    }

    /// Checks the self-describing fields of a v5 metadata block: its own address in 512-byte
    /// units (u64 at `blkno`), the file system UUID (at `uuid`), and optionally its owner.
    func checkHeader(_ b: CheckedBytes, blkno: Int, uuid: Int, owner: (Int, UInt64)?, ownerIs32Bit: Bool = false,
                     what: String, linear: UInt64) throws {
        let at = linear * UInt64(sb.blockSize)
        guard b.u64(at: blkno) == at / 512 else {
            throw damaged("\(what) records address \(b.u64(at: blkno) ?? 0) (512-byte units), not its own \(at / 512); it is misplaced", at: at + UInt64(blkno))
        }
        guard b.slice(at: uuid, count: 16).map(Array.init) == sb.metaUUID else {
            throw damaged("\(what) has a UUID that does not match the superblock", at: at + UInt64(uuid))
        }
        if let (field, expected) = owner {
            let stored = ownerIs32Bit ? b.u32(at: field).map(UInt64.init) : b.u64(at: field)
            guard stored == expected else {
                throw damaged("\(what) belongs to owner \(stored ?? 0), not \(expected)", at: at + UInt64(field))
            }
        }
    }

    /// Checks the little-endian CRC-32C stored at `field` of a metadata block (skipped in fuzz
    /// builds, see `CRC32C.enforced`).
    func verifyCRC(_ raw: [UInt8], field: Int, what: String, at offset: UInt64) throws {
        guard CRC32C.enforced else { return }
        let stored = CheckedBytes(raw, order: .little).u32(at: field) ?? 0
        let computed = CRC32C.checksum(raw, zeroingFieldAt: field)
        guard stored == computed else {
            throw damaged("\(what): checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))",
                          at: offset + UInt64(field))
        }
    }
}
