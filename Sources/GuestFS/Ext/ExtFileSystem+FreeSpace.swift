import CairnCore

extension ExtFileSystem {
    /// Free byte ranges from the block bitmaps. A group flagged BLOCK_UNINIT (valid only with
    /// gdt_csum or metadata_csum) has no bitmap on disk: everything in it is free except its
    /// superblock backup, group descriptors, reserved GDT blocks and any group's bitmaps or
    /// inode table placed inside it (flex_bg), as e2fsprogs and Linux compute it. With
    /// bigalloc such groups are left out entirely. A file system whose journal needs recovery
    /// reports nothing free: its bitmaps may predate committed allocations in the journal.
    package func freeRanges() throws -> [Range<UInt64>] {
        if sb.needsRecovery { return [] }
        let bs = UInt64(sb.blockSize)
        let ratio = sb.clusterRatio
        var blocks: [Range<UInt64>] = []
        func add(_ r: Range<UInt64>) {
            guard !r.isEmpty else { return }
            if let last = blocks.last, last.upperBound == r.lowerBound {
                blocks[blocks.count - 1] = last.lowerBound..<r.upperBound
            } else {
                blocks.append(r)
            }
        }
        let uninitHonoured = sb.hasGroupCsum
        let anyUninit = uninitHonoured && groups.contains { $0.flags & Ext.GroupFlag.blockUninit != 0 }
        let metadata = anyUninit && ratio == 1 ? metadataBlocks() : []
        var m = 0
        let bitmapBytes = Int(sb.clustersPerGroup / 8)
        for (gi, group) in groups.enumerated() {
            let g = UInt64(gi)
            let first = sb.groupFirstBlock(g)
            let count = sb.blocksInGroup(g)
            let end = first + count
            if uninitHonoured && group.flags & Ext.GroupFlag.blockUninit != 0 {
                guard ratio == 1 else { continue }
                var used = sb.superAndDescriptorBlocks(g)
                while m < metadata.count && metadata[m].upperBound <= first { m += 1 }
                var k = m
                while k < metadata.count && metadata[k].lowerBound < end {
                    used.append(metadata[k])
                    k += 1
                }
                used.sort { $0.lowerBound < $1.lowerBound }
                var cursor = first
                for u in used {
                    let lo = max(u.lowerBound, first), hi = min(u.upperBound, end)
                    guard lo < hi else { continue }
                    if lo > cursor { add(cursor..<lo) }
                    cursor = max(cursor, hi)
                }
                if cursor < end { add(cursor..<end) }
                continue
            }
            let at = group.blockBitmap * bs
            let bitmap = try volume.readBytes(at: at, count: sb.blockSize)
            if sb.hasMetadataCsum && CRC32C.enforced {
                let computed = CRC32C.update(sb.checksumSeed, bitmap[0..<bitmapBytes])
                let wide = sb.descSize >= 64
                let stored = group.blockBitmapCsum
                guard (wide ? computed : computed & 0xFFFF) == stored else {
                    throw CairnError(.malformedImage, "block bitmap of group \(g): checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))",
                                     path: volume.name, offset: at, hint: "the file system is damaged; run e2fsck on a restored copy")
                }
            }
            let clusters = Int((count + ratio - 1) / ratio)
            var c = 0
            while c < clusters {
                let byte = bitmap[c >> 3]
                if c & 7 == 0 && c + 8 <= clusters && (byte == 0xFF || byte == 0) {
                    if byte == 0 { add(first + UInt64(c) * ratio..<min(end, first + UInt64(c + 8) * ratio)) }
                    c += 8
                    continue
                }
                if byte & (1 << UInt8(c & 7)) == 0 {
                    add(first + UInt64(c) * ratio..<min(end, first + UInt64(c + 1) * ratio))
                }
                c += 1
            }
        }
        let limit = volume.size
        return blocks.compactMap { r in
            let lo = r.lowerBound * bs, hi = min(r.upperBound * bs, limit)
            return lo < hi ? lo..<hi : nil
        }
    }

    /// Every group's block bitmap, inode bitmap and inode table as block ranges, sorted and merged.
    func metadataBlocks() -> [Range<UInt64>] {
        let bs = UInt64(sb.blockSize)
        let tableBlocks = (UInt64(sb.inodesPerGroup) * UInt64(sb.inodeSize) + bs - 1) / bs
        var all: [Range<UInt64>] = []
        all.reserveCapacity(groups.count * 3)
        for g in groups {
            all.append(g.blockBitmap..<g.blockBitmap + 1)
            all.append(g.inodeBitmap..<g.inodeBitmap + 1)
            all.append(g.inodeTable..<g.inodeTable + tableBlocks)
        }
        all.sort { $0.lowerBound < $1.lowerBound }
        var merged: [Range<UInt64>] = []
        for r in all {
            if let last = merged.last, r.lowerBound <= last.upperBound {
                merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                merged.append(r)
            }
        }
        return merged
    }
}
