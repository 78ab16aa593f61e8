import CairnCore

/// One block group descriptor (32 bytes, or `s_desc_size` with 64bit), the fields the reader
/// uses: block bitmap (0x00, hi 0x20), inode bitmap (0x04, hi 0x24), inode table (0x08, hi
/// 0x28), flags (0x12), block bitmap checksum (0x18, hi 0x38), descriptor checksum (0x1E).
struct ExtGroup: Sendable {
    var blockBitmap: UInt64
    var inodeBitmap: UInt64
    var inodeTable: UInt64
    var flags: UInt16
    var blockBitmapCsum: UInt32
}

/// A parsed inode (the fields of the 128-byte base and of the extra area the reader uses).
struct ExtInode: Sendable {
    var number: UInt64
    /// Byte offset of the inode in the volume (for messages).
    var offset: UInt64
    var mode: UInt16
    var uid: UInt32
    var gid: UInt32
    var size: UInt64
    var links: UInt16
    var flags: UInt32
    var iBlocks: UInt64
    var fileACL: UInt64
    var atime: FileTime
    var ctime: FileTime
    var mtime: FileTime
    var crtime: FileTime?
    /// i_block: 60 bytes (extent root, block pointers, inline data or fast symlink target).
    var block: [UInt8]
    /// The value of the in-inode `system.data` extended attribute (inline data past i_block).
    var inlineTail: [UInt8]
    /// crc32c seed for this inode's metadata (fs seed, inode number, generation).
    var checksumSeed: UInt32

    var kind: FileKind {
        switch mode & 0xF000 {
        case 0x8000: .regular
        case 0x4000: .directory
        case 0xA000: .symlink
        case 0x2000: .characterDevice
        case 0x6000: .blockDevice
        case 0x1000: .fifo
        case 0xC000: .socket
        default: .other
        }
    }

    var hasInlineData: Bool { flags & Ext.InodeFlag.inlineData != 0 }
    var usesExtents: Bool { flags & Ext.InodeFlag.extents != 0 }
    var isEncrypted: Bool { flags & Ext.InodeFlag.encrypted != 0 }

    /// i_block word `i` (little-endian u32).
    func blockWord(_ i: Int) -> UInt32 { CheckedBytes(block).u32(at: 4 * i) ?? 0 }
}

extension ExtFileSystem {
    /// Reads and checks inode `number` (1-based).
    func inode(_ number: UInt64) throws -> ExtInode {
        if let hit = cache.inode(number) { return hit }
        guard number >= 1, number <= UInt64(sb.inodesCount) else {
            throw CairnError(.malformedImage, "inode number \(number) is out of range (1...\(sb.inodesCount))", path: volume.name,
                             hint: "the file system is damaged; run e2fsck on a restored copy")
        }
        let ipg = UInt64(sb.inodesPerGroup)
        let group = (number - 1) / ipg
        let index = (number - 1) % ipg
        guard group < UInt64(groups.count) else {
            throw CairnError(.malformedImage, "inode \(number) lies in block group \(group) past the last group", path: volume.name)
        }
        let offset = groups[Int(group)].inodeTable * UInt64(sb.blockSize) + index * UInt64(sb.inodeSize)
        let raw = try volume.readBytes(at: offset, count: sb.inodeSize)
        let parsed = try parseInode(raw, number: number, offset: offset)
        cache.store(parsed)
        return parsed
    }

    func parseInode(_ raw: [UInt8], number: UInt64, offset: UInt64) throws -> ExtInode {
        let b = CheckedBytes(raw)
        func bad(_ what: String, _ field: Int = 0) -> CairnError {
            CairnError(.malformedImage, "inode \(number): \(what)", path: volume.name, offset: offset + UInt64(field),
                       hint: "the file system is damaged; run e2fsck on a restored copy")
        }
        let u32 = { (o: Int) -> UInt32 in b.u32(at: o) ?? 0 }
        let u16 = { (o: Int) -> UInt16 in b.u16(at: o) ?? 0 }
        let generation = u32(0x64)
        var seed = withUnsafeBytes(of: UInt32(truncatingIfNeeded: number).littleEndian) { CRC32C.update(sb.checksumSeed, $0) }
        seed = withUnsafeBytes(of: generation.littleEndian) { CRC32C.update(seed, $0) }

        var extra = 0
        if raw.count > 128 {
            extra = Int(u16(0x80))
            guard extra % 4 == 0, 128 + extra <= raw.count else { throw bad("extra inode size \(extra) does not fit the \(raw.count)-byte inode", 0x80) }
        }
        /// A field at `o` of `n` bytes is there when the extra area covers it.
        func fits(_ o: Int, _ n: Int) -> Bool { o + n <= 128 + extra }

        if sb.hasMetadataCsum && CRC32C.enforced {
            let hasHi = raw.count > 128 && fits(0x82, 2)
            var crc = CRC32C.update(seed, raw[0..<0x7C])
            crc = CRC32C.update(crc, [0, 0][...])
            crc = CRC32C.update(crc, raw[0x7E..<128])
            if raw.count > 128 {
                crc = CRC32C.update(crc, raw[128..<0x82])
                if hasHi {
                    crc = CRC32C.update(crc, [0, 0][...])
                    crc = CRC32C.update(crc, raw[0x84...])
                } else {
                    crc = CRC32C.update(crc, raw[0x82...])
                }
            }
            let stored = UInt32(u16(0x7C)) | (hasHi ? UInt32(u16(0x82)) << 16 : 0)
            let computed = hasHi ? crc : crc & 0xFFFF
            guard stored == computed else {
                throw bad("checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))", 0x7C)
            }
        }

        let mode = u16(0x00)
        guard mode != 0 else { throw bad("inode is not in use (mode 0)") }
        func time(_ secField: Int, _ extraField: Int?) -> FileTime {
            var seconds = Int64(Int32(bitPattern: u32(secField)))
            var nanos: UInt32 = 0
            if let e = extraField, fits(e, 4) {
                let x = u32(e)
                seconds += Int64(x & 3) << 32
                nanos = min(x >> 2, 999_999_999)
            }
            return FileTime(seconds: seconds, nanoseconds: nanos)
        }
        let flags = u32(0x20)
        let isRegular = mode & 0xF000 == 0x8000
        let sizeHi = (isRegular || sb.hasLargeDir) ? UInt64(u32(0x6C)) << 32 : 0
        var inode = ExtInode(
            number: number, offset: offset, mode: mode,
            uid: UInt32(u16(0x02)) | UInt32(u16(0x78)) << 16,
            gid: UInt32(u16(0x18)) | UInt32(u16(0x7A)) << 16,
            size: UInt64(u32(0x04)) | sizeHi,
            links: u16(0x1A), flags: flags,
            iBlocks: UInt64(u32(0x1C)) | UInt64(u16(0x74)) << 32,
            fileACL: UInt64(u32(0x68)) | UInt64(u16(0x76)) << 32,
            atime: time(0x08, 0x8C), ctime: time(0x0C, 0x84), mtime: time(0x10, 0x88),
            crtime: fits(0x90, 4) ? time(0x90, 0x94) : nil,
            block: Array(raw[0x28..<0x64]), inlineTail: [], checksumSeed: seed)
        if flags & Ext.InodeFlag.inlineData != 0 {
            guard sb.hasInlineData else { throw bad("has inline data but the file system lacks the inline_data feature", 0x20) }
            inode.inlineTail = try systemData(raw, bodyStart: 128 + extra, bad: bad)
        }
        return inode
    }

    /// The value of the `system.data` attribute in the inode body's extended-attribute area
    /// (magic 0xEA020000, then 16-byte entries: name length, name index, value offset (from
    /// the first entry), value inode, value size, hash, name; the list ends with a zero word).
    private func systemData(_ raw: [UInt8], bodyStart: Int, bad: (String, Int) -> CairnError) throws -> [UInt8] {
        let b = CheckedBytes(raw)
        guard bodyStart + 4 <= raw.count, b.u32(at: bodyStart) == Ext.xattrMagic else { return [] }
        let first = bodyStart + 4
        var pos = first
        while pos + 16 <= raw.count {
            guard let word = b.u32(at: pos), word != 0 else { break }
            let nameLen = Int(b.u8(at: pos) ?? 0)
            let index = b.u8(at: pos + 1) ?? 0
            let valueOffset = Int(b.u16(at: pos + 2) ?? 0)
            let valueInode = b.u32(at: pos + 4) ?? 0
            let valueSize = Int(b.u32(at: pos + 8) ?? 0)
            guard let name = b.slice(at: pos + 16, count: nameLen) else { throw bad("extended attribute entry runs past the inode", pos) }
            if index == 7 && Array(name) == Array("data".utf8) {
                guard valueInode == 0 else { throw bad("inline data stored in an extended-attribute inode", pos + 4) }
                guard valueSize <= raw.count, let value = b.slice(at: first + valueOffset, count: valueSize) else {
                    throw bad("inline data attribute value (\(valueSize) bytes at \(valueOffset)) runs past the inode", pos + 2)
                }
                return Array(value)
            }
            pos += (16 + nameLen + 3) & ~3
        }
        return []
    }
}
