import CairnCore
import Synchronization

/// Parsed file maps (inode + extent list), directory listings and the AGs whose AGI has been
/// checked, shared by the copies of one `XFSFileSystem`. Bounded: a cache is emptied when it
/// is full (`XFSLimits.cachedMaps`, `cachedDirectories`, `cachedDirectoryEntries`).
final class XFSCache: Sendable {
    struct State {
        var maps: [UInt64: XFSFileMap] = [:]
        var directories: [UInt64: [DirectoryEntry]] = [:]
        var cachedEntries = 0
        var checkedAGIs: Set<UInt64> = []
    }

    let state = Mutex(State())
}

/// A read-only XFS file system (v5, and v4 with version 2 directories) over a volume. Nodes
/// are XFS inode numbers; the root is the superblock's root inode. See docs/XFS.md.
package struct XFSFileSystem: FileSystem {
    package let volume: any BlockSource
    let sb: XFSSuperblock
    let cache = XFSCache()

    package var typeName: String { "xfs" }
    package var label: String { sb.label }
    package var uuid: String? { sb.uuidString }
    package var blockSize: Int { sb.blockSize }
    package var rootNode: UInt64 { sb.rootIno }

    package init(volume: any BlockSource) throws {
        self.volume = volume
        guard volume.size >= 512 else {
            throw CairnError(.malformedImage, "volume of \(volume.size) bytes is too small for XFS", path: volume.name, offset: 0)
        }
        let head = try volume.readBytes(at: 0, count: Int(min(volume.size, 32768)))
        sb = try XFSSuperblock.parse(head, volume: volume)
        // The root must be a directory; this also checks AG 0's AGI.
        let root = try inode(sb.rootIno)
        guard root.kind == .directory else {
            throw damaged("root inode \(sb.rootIno) is a \(root.kind.rawValue), not a directory", at: root.offset + 2)
        }
    }

    /// True when `volume` starts with an XFS superblock magic and a plausible version and block size.
    package static func probe(_ volume: any BlockSource) -> Bool {
        guard volume.size >= 512, let raw = try? volume.readBytes(at: 0, count: 512) else { return false }
        let b = CheckedBytes(raw, order: .big)
        guard b.u32(at: 0) == XFSMagic.superblock, let bs = b.u32(at: 4), let version = b.u16(at: 100) else { return false }
        return (4...5).contains(version & 0xF) && bs >= 512 && bs <= 65536 && bs & (bs - 1) == 0
    }

    /// A `.malformedImage` error about a damaged structure, with the usual advice.
    func damaged(_ message: String, at offset: UInt64?) -> CairnError {
        CairnError(.malformedImage, "XFS: \(message)", path: volume.name, offset: offset,
                   hint: "the file system is damaged; run xfs_repair -n on a restored copy")
    }

    // MARK: - Inodes and maps

    /// Reads and checks inode `ino` (and, once per AG, that AG's AGI header).
    func inode(_ ino: UInt64) throws -> XFSInode {
        guard let offset = sb.inodeLocation(ino) else {
            throw CairnError(.malformedImage, "XFS inode number \(ino) lies outside the file system", path: volume.name,
                             hint: "a directory entry is damaged; run xfs_repair -n on a restored copy")
        }
        try checkAGI(ino >> UInt64(sb.agInoLog))
        let raw = try volume.readBytes(at: offset, count: sb.inodeSize)
        return try XFSInode.parse(raw, ino: ino, offset: offset, sb: sb, volume: volume.name)
    }

    /// The inode and its block map, from the cache when possible.
    func fileMap(_ ino: UInt64) throws -> XFSFileMap {
        if let hit = cache.state.withLock({ $0.maps[ino] }) { return hit }
        let node = try inode(ino)
        let map = XFSFileMap(inode: node, extents: try blockMap(of: node))
        cache.state.withLock { state in
            if state.maps.count >= XFSLimits.cachedMaps { state.maps.removeAll(keepingCapacity: true) }
            state.maps[ino] = map
        }
        return map
    }

    /// Checks the AGI of AG `agno` (sector 2 of the AG) once: magic "XAGI" (0), version 1 (4),
    /// sequence number (8), length (12); v5: UUID (296), CRC (312, little-endian).
    func checkAGI(_ agno: UInt64) throws {
        if cache.state.withLock({ $0.checkedAGIs.contains(agno) }) { return }
        let at = sb.agStart(agno) + 2 * UInt64(sb.sectorSize)
        let raw = try volume.readBytes(at: at, count: sb.sectorSize)
        let b = CheckedBytes(raw, order: .big)
        guard b.u32(at: 0) == XFSMagic.agi, b.u32(at: 4) == 1, b.u32(at: 8) == UInt32(truncatingIfNeeded: agno),
              b.u32(at: 12).map(UInt64.init) == sb.agLength(agno) else {
            throw damaged("AGI of AG \(agno) has a bad magic, version, sequence number or length", at: at)
        }
        if sb.hasCRC {
            try verifyCRC(raw, field: 312, what: "AGI of AG \(agno)", at: at)
            guard b.slice(at: 296, count: 16).map(Array.init) == sb.metaUUID else {
                throw damaged("AGI of AG \(agno) has a UUID that does not match the superblock", at: at + 296)
            }
        }
        cache.state.withLock { _ = $0.checkedAGIs.insert(agno) }
    }

    // MARK: - FileSystem

    package func metadata(of node: UInt64) throws -> FileMetadata {
        let i = try inode(node)
        return FileMetadata(kind: i.kind, permissions: UInt32(i.mode & 0o7777), uid: i.uid, gid: i.gid, size: i.size,
                            linkCount: i.linkCount, modified: i.modified, accessed: i.accessed, changed: i.changed,
                            created: i.created, device: i.device)
    }

    package func readLink(_ node: UInt64) throws -> String {
        let map = try fileMap(node)
        let i = map.inode
        guard i.kind == .symlink else {
            throw CairnError(.malformedImage, "XFS inode \(node) is a \(i.kind.rawValue), not a symbolic link", path: volume.name, offset: i.offset)
        }
        guard i.size > 0, i.size <= UInt64(XFSLimits.maxSymlinkLength) else {
            throw damaged("symlink inode \(node) has a target length of \(i.size) bytes (1...\(XFSLimits.maxSymlinkLength))", at: i.offset + 56)
        }
        let length = Int(i.size)
        if i.format == .local {
            return String(decoding: i.dataFork.prefix(length), as: UTF8.self)
        }
        // Remote target: blocks in file order; on v5 each starts with a 56-byte header: magic
        // "XSLM" (0), offset of this piece in the target (4), bytes in this block (8), CRC (12,
        // little-endian), UUID (16), owner inode (32), block number (40), LSN (48).
        var target: [UInt8] = []
        for e in map.extents where target.count < length {
            guard !e.unwritten else { throw damaged("symlink inode \(node) has an unwritten extent", at: i.offset) }
            for k in 0..<min(e.count, UInt64(length)) where target.count < length {
                let linear = e.physical + k
                let at = linear * UInt64(sb.blockSize)
                let raw = try volume.readBytes(at: at, count: sb.blockSize)
                if sb.hasCRC {
                    let b = CheckedBytes(raw, order: .big)
                    guard b.u32(at: 0) == XFSMagic.symlink else { throw damaged("remote symlink block of inode \(node) has no \"XSLM\" magic", at: at) }
                    try verifyCRC(raw, field: 12, what: "remote symlink block of inode \(node)", at: at)
                    try checkHeader(b, blkno: 40, uuid: 16, owner: (32, node), what: "remote symlink block of inode \(node)", linear: linear)
                    let pieceOffset = Int(b.u32(at: 4) ?? 0), pieceBytes = Int(b.u32(at: 8) ?? 0)
                    guard pieceOffset == target.count, pieceBytes >= 1, pieceBytes <= sb.blockSize - 56,
                          pieceBytes <= length - target.count else {
                        throw damaged("remote symlink block of inode \(node) holds bytes \(pieceOffset)+\(pieceBytes), expected from \(target.count) of \(length)", at: at + 4)
                    }
                    target += raw[56..<56 + pieceBytes]
                } else {
                    target += raw.prefix(length - target.count)
                }
            }
        }
        guard target.count == length else {
            throw damaged("symlink inode \(node) maps \(target.count) of its \(length) target bytes", at: i.offset)
        }
        return String(decoding: target, as: UTF8.self)
    }

    /// The cached block map clipped to the size: unwritten extents and gaps are holes. Files
    /// on the realtime device have no mapping in this volume (nil).
    package func fileExtents(_ node: UInt64) throws -> [FileExtent]? {
        let map = try fileMap(node)
        let i = map.inode
        guard i.kind == .regular else {
            throw CairnError(.usage, "XFS inode \(node) is a \(i.kind.rawValue), not a regular file; only regular files have extents",
                             path: volume.name, offset: i.offset)
        }
        guard i.flags & XFSInode.realtimeFlag == 0 else { return nil }
        let bs = UInt64(sb.blockSize)
        var out: [FileExtent] = []
        var pos: UInt64 = 0
        // Extents ascend without overlap and end below Int64.max bytes (checked by the map).
        for e in map.extents {
            let start = e.logical * bs
            guard start < i.size else { break }
            out.append(logicalOffset: pos, physicalOffset: nil, length: start - pos)
            let length = min(e.count * bs, i.size - start)
            out.append(logicalOffset: start, physicalOffset: e.unwritten ? nil : e.physical * bs, length: length)
            pos = start + length
        }
        out.append(logicalOffset: pos, physicalOffset: nil, length: i.size - pos)
        return out
    }

    package func read(_ node: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let map = try fileMap(node)
        let i = map.inode
        guard i.kind == .regular else {
            throw CairnError(.malformedImage, "XFS inode \(node) is a \(i.kind.rawValue), not a regular file", path: volume.name, offset: i.offset)
        }
        guard i.flags & XFSInode.realtimeFlag == 0 else {
            throw CairnError(.unsupported, "XFS inode \(node) keeps its data on the realtime device, which is not part of this volume",
                             path: volume.name, offset: i.offset + 90)
        }
        guard offset < i.size, buffer.count > 0 else { return 0 }
        let total = Int(min(UInt64(buffer.count), i.size - offset))
        let bs = UInt64(sb.blockSize)
        var done = 0
        var index = map.firstExtent(atOrAfter: offset / bs)
        while done < total {
            let pos = offset + UInt64(done)
            let want = total - done
            let piece: Int
            if index < map.extents.count, map.extents[index].logical * bs <= pos {
                let e = map.extents[index]
                let extentEnd = e.logicalEnd * bs
                guard pos < extentEnd else { index += 1; continue }
                piece = Int(min(UInt64(want), extentEnd - pos))
                let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + piece])
                if e.unwritten {
                    target.initializeMemory(as: UInt8.self, repeating: 0)
                } else {
                    try volume.read(into: target, at: e.physical * bs + (pos - e.logical * bs))
                }
                index += 1
            } else {
                // A hole up to the next extent (or the end of the read).
                let next = index < map.extents.count ? map.extents[index].logical * bs : UInt64.max
                piece = Int(min(UInt64(want), next - pos))
                UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + piece]).initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += piece
        }
        return total
    }
}
