import CairnCore

/// Formats of an inode's data fork (`di_format`).
enum XFSForkFormat: UInt8, Sendable {
    case device = 0, local = 1, extents = 2, btree = 3
}

/// A checked on-disk inode (`struct xfs_dinode`, big-endian). Core fields read, by byte
/// offset: magic "IN" (0, u16), mode (2, u16), version (4), data fork format (5), v1 link
/// count (6, u16), uid (8), gid (12), link count (16), 64-bit extent count with NREXT64 (24,
/// u64), atime (32), mtime (40), ctime (48) (each u32 seconds + u32 nanoseconds, or with
/// BIGTIME a u64 of nanoseconds since 1901-12-13T20:45:52Z), size (56, u64), extent count
/// (76, u32), attribute fork offset in 8-byte units (82), flags (90, u16). Version 3 adds: CRC
/// (100, little-endian CRC-32C over the whole inode), flags2 (120, u64), creation time (144),
/// inode number (152, u64), UUID (160). The data fork starts at 176 (v3) or 100 (v1/v2).
struct XFSInode: Sendable {
    var number: UInt64
    var offset: UInt64
    var mode: UInt16
    var format: XFSForkFormat
    var uid: UInt32
    var gid: UInt32
    var linkCount: UInt32
    var accessed: FileTime
    var modified: FileTime
    var changed: FileTime
    var created: FileTime?
    var size: UInt64
    var extentCount: UInt64
    var flags: UInt16
    /// The data fork's bytes (its whole literal area).
    var dataFork: [UInt8]

    static let realtimeFlag: UInt16 = 0x1
    static let bigtimeFlag2: UInt64 = 0x8
    static let nrext64Flag2: UInt64 = 0x10

    var kind: FileKind {
        switch mode & 0o170000 {
        case 0o100000: .regular
        case 0o040000: .directory
        case 0o120000: .symlink
        case 0o020000: .characterDevice
        case 0o060000: .blockDevice
        case 0o010000: .fifo
        case 0o140000: .socket
        default: .other
        }
    }

    /// Parses inode `ino` from its `raw` bytes (one inode, `sb.inodeSize` long) read at `offset`.
    static func parse(_ raw: [UInt8], ino: UInt64, offset: UInt64, sb: XFSSuperblock, volume: String) throws -> XFSInode {
        func bad(_ message: String, _ field: UInt64) -> CairnError {
            CairnError(.malformedImage, "XFS inode \(ino): \(message)", path: volume, offset: offset + field,
                       hint: "the file system is damaged; run xfs_repair -n on a restored copy")
        }
        let b = CheckedBytes(raw, order: .big)
        guard raw.count == sb.inodeSize, b.u16(at: 0) == XFSMagic.inode else { throw bad("magic \"IN\" missing", 0) }
        let version = b.u8(at: 4) ?? 0
        guard sb.hasCRC ? version == 3 : (version == 1 || version == 2) else {
            throw bad("inode version \(version) does not match the v\(sb.version) file system", 4)
        }
        let coreSize = version == 3 ? 176 : 100
        var flags2: UInt64 = 0
        if version == 3 {
            if CRC32C.enforced {
                let stored = CheckedBytes(raw, order: .little).u32(at: 100) ?? 0
                let computed = CRC32C.checksum(raw, zeroingFieldAt: 100)
                guard stored == computed else {
                    throw bad("checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))", 100)
                }
            }
            guard b.u64(at: 152) == ino else { throw bad("records inode number \(b.u64(at: 152) ?? 0); the inode is misplaced", 152) }
            guard b.slice(at: 160, count: 16).map(Array.init) == sb.metaUUID else { throw bad("UUID does not match the superblock", 160) }
            flags2 = b.u64(at: 120) ?? 0
        }
        guard let rawFormat = b.u8(at: 5), let format = XFSForkFormat(rawValue: rawFormat) else {
            throw bad("data fork format \(b.u8(at: 5) ?? 0) is not supported (device, local, extents, btree)", 5)
        }
        let literal = sb.inodeSize - coreSize
        let forkOffset = Int(b.u8(at: 82) ?? 0) * 8
        guard forkOffset <= literal else { throw bad("attribute fork offset \(forkOffset) is past the inode's literal area (\(literal) bytes)", 82) }
        let forkSize = forkOffset == 0 ? literal : forkOffset
        let bigtime = flags2 & bigtimeFlag2 != 0
        func time(_ at: Int) -> FileTime {
            if bigtime {
                let ns = b.u64(at: at) ?? 0
                return FileTime(seconds: Int64(ns / 1_000_000_000) - (1 << 31), nanoseconds: UInt32(ns % 1_000_000_000))
            }
            let seconds = Int32(bitPattern: b.u32(at: at) ?? 0)
            return FileTime(seconds: Int64(seconds), nanoseconds: min(b.u32(at: at + 4) ?? 0, 999_999_999))
        }
        let size = b.u64(at: 56) ?? 0
        guard size <= UInt64(Int64.max) else { throw bad("size \(size) is larger than XFS allows", 56) }
        let extentCount = flags2 & nrext64Flag2 != 0 ? (b.u64(at: 24) ?? 0) : UInt64(b.u32(at: 76) ?? 0)
        let inode = XFSInode(
            number: ino, offset: offset, mode: b.u16(at: 2) ?? 0, format: format, uid: b.u32(at: 8) ?? 0, gid: b.u32(at: 12) ?? 0,
            linkCount: version == 1 ? UInt32(b.u16(at: 6) ?? 0) : (b.u32(at: 16) ?? 0),
            accessed: time(32), modified: time(40), changed: time(48), created: version == 3 ? time(144) : nil,
            size: size, extentCount: extentCount, flags: b.u16(at: 90) ?? 0,
            dataFork: Array(b.slice(at: coreSize, count: forkSize) ?? []))
        // Each kind keeps its data in the forms XFS gives it.
        let allowed: [XFSForkFormat]
        switch inode.kind {
        case .regular: allowed = [.extents, .btree]
        case .directory, .symlink: allowed = [.local, .extents, .btree]
        case .characterDevice, .blockDevice, .fifo, .socket: allowed = [.device]
        case .other: throw bad("mode 0o\(String(inode.mode, radix: 8)) has no valid file type (a free inode?)", 2)
        }
        guard allowed.contains(format) else { throw bad("data fork format \(format) is invalid for a \(inode.kind.rawValue) inode", 5) }
        if format == .local && size > UInt64(forkSize) {
            throw bad("inline data of \(size) bytes does not fit the \(forkSize)-byte data fork", 56)
        }
        return inode
    }

    /// The device number of a device inode, converted from XFS's encoding (major << 18 |
    /// minor) to Linux's `makedev` layout (what `stat` reports as st_rdev).
    var device: UInt64 {
        guard format == .device, let raw = CheckedBytes(dataFork, order: .big).u32(at: 0) else { return 0 }
        let major = UInt64(raw >> 18), minor = UInt64(raw & 0x3FFFF)
        return ((major & 0xFFFF_F000) << 32) | ((major & 0xFFF) << 8) | ((minor & 0xFFFF_FF00) << 12) | (minor & 0xFF)
    }
}
