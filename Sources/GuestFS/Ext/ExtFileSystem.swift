import CairnCore
import Synchronization

/// A read-only ext2 / ext3 / ext4 reader over a `BlockSource` (see docs/EXT4.md).
///
/// Nodes are inode numbers; the root directory is inode 2. Files are mapped through extent
/// trees (ext4) or direct/indirect block pointers (ext2/3), or stored inline in the inode.
/// Metadata checksums (metadata_csum) are verified for the superblock, group descriptors,
/// inodes, extent blocks, directory leaf blocks and block bitmaps.
package struct ExtFileSystem: FileSystem {
    package let volume: any BlockSource
    let sb: ExtSuperblock
    let groups: [ExtGroup]
    let cache = ExtCache()

    package var typeName: String { sb.typeName }
    package var label: String { sb.label }
    package var uuid: String? { sb.uuid.allSatisfy { $0 == 0 } ? nil : sb.uuidString }
    package var blockSize: Int { sb.blockSize }
    package var rootNode: UInt64 { Ext.rootInode }

    /// True when the volume carries an ext2/3/4 superblock (magic and sane geometry).
    package static func probe(_ volume: any BlockSource) -> Bool { ExtSuperblock.probe(volume) }

    package init(volume: any BlockSource) throws {
        self.volume = volume
        let sb = try ExtSuperblock(volume: volume)
        self.sb = sb
        self.groups = try Self.readGroups(volume, sb)
    }

    /// Reads every group descriptor, verifies its checksum (metadata_csum) and checks that its
    /// bitmaps and inode table lie inside the file system.
    static func readGroups(_ volume: any BlockSource, _ sb: ExtSuperblock) throws -> [ExtGroup] {
        let bs = UInt64(sb.blockSize)
        let tableBlocks = (UInt64(sb.inodesPerGroup) * UInt64(sb.inodeSize) + bs - 1) / bs
        var out: [ExtGroup] = []
        out.reserveCapacity(Int(sb.groupCount))
        var n: UInt64 = 0
        while UInt64(out.count) < sb.groupCount {
            let block = sb.descriptorBlockLocation(n)
            guard block < sb.blocksCount else {
                throw CairnError(.malformedImage, "group descriptor block \(n) would be at block \(block), past the end of the file system",
                                 path: volume.name, offset: Ext.superblockOffset)
            }
            let raw = try volume.readBytes(at: block * bs, count: sb.blockSize)
            let b = CheckedBytes(raw)
            var slot = 0
            while slot < Int(sb.descPerBlock) && UInt64(out.count) < sb.groupCount {
                let g = UInt64(out.count)
                let o = slot * sb.descSize
                let at = block * bs + UInt64(o)
                func u32(_ f: Int) -> UInt64 { UInt64(b.u32(at: o + f) ?? 0) }
                func u16(_ f: Int) -> UInt64 { UInt64(b.u16(at: o + f) ?? 0) }
                let wide = sb.descSize >= 64
                let group = ExtGroup(
                    blockBitmap: u32(0x00) | (wide ? u32(0x20) << 32 : 0),
                    inodeBitmap: u32(0x04) | (wide ? u32(0x24) << 32 : 0),
                    inodeTable: u32(0x08) | (wide ? u32(0x28) << 32 : 0),
                    flags: UInt16(u16(0x12)),
                    blockBitmapCsum: UInt32(u16(0x18)) | (wide ? UInt32(u16(0x38)) << 16 : 0))
                if sb.hasMetadataCsum && CRC32C.enforced {
                    var crc = withUnsafeBytes(of: UInt32(truncatingIfNeeded: g).littleEndian) { CRC32C.update(sb.checksumSeed, $0) }
                    crc = CRC32C.update(crc, raw[o..<o + 0x1E])
                    crc = CRC32C.update(crc, [0, 0][...])
                    crc = CRC32C.update(crc, raw[o + 0x20..<o + sb.descSize])
                    let stored = UInt32(u16(0x1E))
                    guard stored == crc & 0xFFFF else {
                        throw CairnError(.malformedImage, "group descriptor \(g): checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(crc & 0xFFFF, radix: 16)))",
                                         path: volume.name, offset: at + 0x1E, hint: "the file system is damaged; run e2fsck on a restored copy")
                    }
                }
                guard group.blockBitmap < sb.blocksCount, group.inodeBitmap < sb.blocksCount, group.inodeTable > 0,
                      group.inodeTable < sb.blocksCount, tableBlocks <= sb.blocksCount - group.inodeTable else {
                    throw CairnError(.malformedImage, "group descriptor \(g): bitmap or inode table location (blocks \(group.blockBitmap), \(group.inodeBitmap), \(group.inodeTable)) lies outside the \(sb.blocksCount)-block file system",
                                     path: volume.name, offset: at, hint: "the file system is damaged; run e2fsck on a restored copy")
                }
                out.append(group)
                slot += 1
            }
            n += 1
        }
        return out
    }

    // MARK: - FileSystem

    package func metadata(of node: UInt64) throws -> FileMetadata {
        let i = try inode(node)
        let kind = i.kind
        var device: UInt64 = 0
        if kind == .characterDevice || kind == .blockDevice {
            device = UInt64(i.blockWord(0) != 0 ? i.blockWord(0) : i.blockWord(1))
        }
        return FileMetadata(kind: kind, permissions: UInt32(i.mode & 0o7777), uid: i.uid, gid: i.gid, size: i.size,
                            linkCount: UInt32(i.links), modified: i.mtime, accessed: i.atime, changed: i.ctime,
                            created: i.crtime, device: device)
    }

    package func readLink(_ node: UInt64) throws -> String {
        let i = try inode(node)
        guard i.kind == .symlink else {
            throw CairnError(.malformedImage, "inode \(node) is not a symbolic link", path: volume.name, offset: i.offset)
        }
        try refuseEncrypted(i)
        guard i.size <= Ext.maxSymlinkLength else {
            throw CairnError(.malformedImage, "symbolic link inode \(node) claims a \(i.size)-byte target", path: volume.name, offset: i.offset + 4)
        }
        let n = Int(i.size)
        var bytes: [UInt8]
        if i.hasInlineData {
            bytes = Array((i.block + i.inlineTail).prefix(n))
        } else if isFastSymlink(i) {
            bytes = Array(i.block.prefix(n))
        } else {
            bytes = [UInt8](repeating: 0, count: n)
            var done = 0
            try bytes.withUnsafeMutableBytes { buf in
                while done < n {
                    let got = try readData(i, into: UnsafeMutableRawBufferPointer(rebasing: buf[done...]), at: UInt64(done))
                    if got == 0 { break }
                    done += got
                }
            }
        }
        guard bytes.count == n else {
            throw CairnError(.malformedImage, "symbolic link inode \(node): target shorter than its \(n)-byte size", path: volume.name, offset: i.offset)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Linux: a symlink without inline data whose target fits i_block and that owns no data
    /// blocks (i_blocks counts only an extended-attribute block if any) keeps it in i_block.
    func isFastSymlink(_ i: ExtInode) -> Bool {
        guard !i.hasInlineData, i.size < 60 else { return false }
        let eaSectors: UInt64 = i.fileACL != 0 ? UInt64(sb.clusterSize / 512) : 0
        return i.iBlocks <= eaSectors
    }

    package func read(_ node: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let i = try inode(node)
        guard i.kind == .regular else {
            throw CairnError(.malformedImage, "inode \(node) is not a regular file (\(i.kind.rawValue))", path: volume.name, offset: i.offset)
        }
        try refuseEncrypted(i)
        return try readData(i, into: buffer, at: offset)
    }

    func refuseEncrypted(_ i: ExtInode) throws {
        if i.isEncrypted {
            throw CairnError(.unsupported, "inode \(i.number) is encrypted (fscrypt); its contents and names cannot be read without the key",
                             path: volume.name, offset: i.offset + 0x20)
        }
    }

    /// Content bytes of `i` at `offset` (clipped to its size): inline data, or mapped blocks
    /// read in as few pieces as the mapping allows, holes and unwritten extents as zeros.
    func readData(_ i: ExtInode, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard offset < i.size, buffer.count > 0 else { return 0 }
        let n = Int(min(UInt64(buffer.count), i.size - offset))
        let out = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
        if i.hasInlineData {
            out.initializeMemory(as: UInt8.self, repeating: 0)
            let inline = i.block + i.inlineTail
            if offset < UInt64(inline.count) {
                let start = Int(offset)
                let count = min(n, inline.count - start)
                inline.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<start + count])) }
            }
            return n
        }
        try forEachPiece(i, from: offset, count: UInt64(n)) { logical, physical, length in
            let dst = UnsafeMutableRawBufferPointer(rebasing: out[Int(logical - offset)..<Int(logical - offset + length)])
            if let physical {
                try volume.read(into: dst, at: physical)
            } else {
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
        return n
    }
}

/// Bounded caches shared by copies of one `ExtFileSystem`: parsed inodes, the extent lists of
/// files, and indirect blocks (each cache is emptied when it reaches its bound).
final class ExtCache: Sendable {
    static let maxInodes = 8192
    static let maxRuns = 1 << 20
    static let maxIndirectBlocks = 64

    struct State {
        var inodes: [UInt64: ExtInode] = [:]
        var runs: [UInt64: [ExtRun]] = [:]
        var runCount = 0
        var indirect: [UInt64: [UInt32]] = [:]
    }
    let state = Mutex(State())

    func inode(_ n: UInt64) -> ExtInode? { state.withLock { $0.inodes[n] } }

    func store(_ i: ExtInode) {
        state.withLock { s in
            if s.inodes.count >= Self.maxInodes { s.inodes.removeAll(keepingCapacity: true) }
            s.inodes[i.number] = i
        }
    }

    func runs(_ n: UInt64) -> [ExtRun]? { state.withLock { $0.runs[n] } }

    func store(runs: [ExtRun], for n: UInt64) {
        guard runs.count <= Self.maxRuns else { return }
        state.withLock { s in
            if s.runCount + runs.count > Self.maxRuns {
                s.runs.removeAll()
                s.runCount = 0
            }
            s.runs[n] = runs
            s.runCount += runs.count
        }
    }

    func indirect(_ block: UInt64) -> [UInt32]? { state.withLock { $0.indirect[block] } }

    func store(indirect: [UInt32], at block: UInt64) {
        state.withLock { s in
            if s.indirect.count >= Self.maxIndirectBlocks { s.indirect.removeAll(keepingCapacity: true) }
            s.indirect[block] = indirect
        }
    }
}
