import CairnCore

/// What a directory entry or inode is.
package enum FileKind: String, Sendable, Equatable, Hashable {
    case regular, directory, symlink, characterDevice, blockDevice, fifo, socket, other

    /// The file-type code Linux file systems store in directory entries (ext2/3/4
    /// `EXT4_FT_*`, XFS `XFS_DIR3_FT_*`: the same numbers); 0 and unknown codes say nothing.
    package init?(direntType t: UInt8) {
        switch t {
        case 1: self = .regular
        case 2: self = .directory
        case 3: self = .characterDevice
        case 4: self = .blockDevice
        case 5: self = .fifo
        case 6: self = .socket
        case 7: self = .symlink
        default: return nil
        }
    }

    /// The `ls -l` type letter.
    package var letter: Character {
        switch self {
        case .regular: "-"
        case .directory: "d"
        case .symlink: "l"
        case .characterDevice: "c"
        case .blockDevice: "b"
        case .fifo: "p"
        case .socket: "s"
        case .other: "?"
        }
    }
}

/// A point in time as file systems store it: seconds since the Unix epoch (UTC) and
/// nanoseconds. File systems with coarser clocks (FAT: 2 s, local time taken as UTC) fill what
/// they have.
package struct FileTime: Sendable, Equatable, Hashable, Comparable {
    package var seconds: Int64
    package var nanoseconds: UInt32

    package init(seconds: Int64, nanoseconds: UInt32 = 0) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }

    package static func < (a: FileTime, b: FileTime) -> Bool {
        (a.seconds, a.nanoseconds) < (b.seconds, b.nanoseconds)
    }
}

/// A file's metadata, in POSIX terms. File systems without owners or modes (FAT, NTFS read
/// without a security mapping) report uid/gid 0 and a mode derived from their attributes
/// (directories 0o755, files 0o644, read-only files without write bits).
package struct FileMetadata: Sendable, Equatable {
    package var kind: FileKind
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`), without the type bits.
    package var permissions: UInt32
    package var uid: UInt32
    package var gid: UInt32
    /// Length of the content in bytes (for symlinks: of the target).
    package var size: UInt64
    package var linkCount: UInt32
    package var modified: FileTime
    package var accessed: FileTime
    /// Inode change time (NTFS: MFT record change time; FAT: same as modified).
    package var changed: FileTime
    /// Creation time when the file system keeps one.
    package var created: FileTime?
    /// Device number for character and block devices (Linux encoding: major << 8 | minor for
    /// the old format, as stored), 0 otherwise.
    package var device: UInt64

    package init(kind: FileKind, permissions: UInt32, uid: UInt32 = 0, gid: UInt32 = 0, size: UInt64, linkCount: UInt32 = 1,
                 modified: FileTime, accessed: FileTime? = nil, changed: FileTime? = nil, created: FileTime? = nil, device: UInt64 = 0) {
        self.kind = kind
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.size = size
        self.linkCount = linkCount
        self.modified = modified
        self.accessed = accessed ?? modified
        self.changed = changed ?? modified
        self.created = created
        self.device = device
    }
}

/// One entry of a directory ("." and ".." are never listed).
package struct DirectoryEntry: Sendable, Equatable {
    package var name: String
    /// The node the entry names (see `FileSystem.rootNode`).
    package var node: UInt64
    /// The kind when the directory records it (ext4 file type, FAT attributes); nil when only
    /// the node's metadata can tell.
    package var kind: FileKind?

    package init(name: String, node: UInt64, kind: FileKind? = nil) {
        self.name = name
        self.node = node
        self.kind = kind
    }
}

/// Where a piece of a file's content lives: `length` bytes at `logicalOffset` in the file
/// are the bytes at `physicalOffset` in the volume, or a hole (reads as zeros) when
/// `physicalOffset` is nil.
package struct FileExtent: Sendable, Equatable {
    package var logicalOffset: UInt64
    package var physicalOffset: UInt64?
    package var length: UInt64

    package init(logicalOffset: UInt64, physicalOffset: UInt64?, length: UInt64) {
        self.logicalOffset = logicalOffset
        self.physicalOffset = physicalOffset
        self.length = length
    }
}

extension [FileExtent] {
    /// Appends `length` bytes at `logicalOffset` (a hole when `physicalOffset` is nil), merged
    /// into the last extent when it ends at `logicalOffset` and both are holes or the new
    /// piece continues it in the volume. Zero lengths are dropped.
    mutating func append(logicalOffset: UInt64, physicalOffset: UInt64?, length: UInt64) {
        guard length > 0 else { return }
        if let last = self.last, last.logicalOffset + last.length == logicalOffset {
            switch (last.physicalOffset, physicalOffset) {
            case (nil, nil):
                self[count - 1].length += length
                return
            case let (a?, b?) where a + last.length == b:
                self[count - 1].length += length
                return
            default:
                break
            }
        }
        append(FileExtent(logicalOffset: logicalOffset, physicalOffset: physicalOffset, length: length))
    }
}

/// A read-only guest file system over a `BlockSource` (a partition, a logical volume or a
/// whole disk). Readers are pure and synchronous; every malformed structure is a thrown
/// `CairnError(.malformedImage, ...)` naming the structure and its byte offset in the volume,
/// never a trap, never an unbounded loop or allocation.
///
/// Nodes are opaque 64-bit numbers the reader hands out: inode numbers (ext, XFS), MFT record
/// numbers (NTFS), directory-entry positions (FAT). `rootNode` is the root directory.
package protocol FileSystem: Sendable {
    /// Short type name as `blkid` prints it: "ext2", "ext3", "ext4", "xfs", "ntfs", "vfat".
    var typeName: String { get }
    /// Volume label (may be empty).
    var label: String { get }
    /// Volume UUID / serial number in the usual text form, nil when there is none.
    var uuid: String? { get }
    /// Allocation unit in bytes (block or cluster size).
    var blockSize: Int { get }
    /// The volume the file system lives on.
    var volume: any BlockSource { get }

    var rootNode: UInt64 { get }

    func metadata(of node: UInt64) throws -> FileMetadata

    /// The entries of directory `node`, in on-disk order, without "." and "..".
    /// Throws `.malformedImage` if `node` is not a directory.
    func directory(_ node: UInt64) throws -> [DirectoryEntry]

    /// The target of symlink `node`.
    func readLink(_ node: UInt64) throws -> String

    /// Reads file content at `offset` into `buffer`; returns the byte count read, short only
    /// at the end of the file. Holes and unwritten extents read as zeros; compressed or
    /// resident data is decoded.
    func read(_ node: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int

    /// Where the content of regular file `node` lives in the volume: extents in ascending logical
    /// order covering [0, size) (holes as extents with a nil physical offset; unwritten/sparse
    /// ranges as holes), or nil when the content is not a plain mapping of volume bytes
    /// (data inside the inode or MFT record, inline data, compressed or encrypted data).
    /// Adjacent extents that continue each other both logically and physically are merged.
    /// Throws `.usage` when `node` is not a regular file (directories included).
    func fileExtents(_ node: UInt64) throws -> [FileExtent]?

    /// The byte ranges of the volume that the file system marks free (not allocated to any
    /// file, directory or metadata), ascending and non-overlapping. Backups treat them as zero.
    /// Must never include a byte that is in use: when in doubt, leave a range out.
    func freeRanges() throws -> [Range<UInt64>]
}

extension FileSystem {
    /// Whole content of a (small) file; throws if it is larger than `limit` bytes.
    package func readAll(_ node: UInt64, limit: UInt64 = 64 << 20) throws -> [UInt8] {
        let meta = try metadata(of: node)
        guard meta.size <= limit else {
            throw CairnError(.unsupported, "file of \(meta.size) bytes is larger than the \(limit)-byte limit of this read", path: volume.name)
        }
        var out = [UInt8](repeating: 0, count: Int(meta.size))
        var done = 0
        try out.withUnsafeMutableBytes { buf in
            while done < buf.count {
                let n = try read(node, into: UnsafeMutableRawBufferPointer(rebasing: buf[done...]), at: UInt64(done))
                if n == 0 { break }
                done += n
            }
        }
        if done < out.count { out.removeLast(out.count - done) }
        return out
    }

    /// Reads the first `size` bytes of `node` piece by piece through `buffer` and hands each
    /// piece and its file offset to `body`; stops early at the file's real end. Returns the
    /// bytes read. (What cat, restore-files and diff --content do with a file's content.)
    @discardableResult
    package func forEachPiece(of node: UInt64, size: UInt64, buffer: UnsafeMutableRawBufferPointer,
                              _ body: (UnsafeRawBufferPointer, UInt64) throws -> Void) throws -> UInt64 {
        var offset: UInt64 = 0
        while offset < size {
            let want = Int(min(UInt64(buffer.count), size - offset))
            let n = try read(node, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]), at: offset)
            if n == 0 { break }
            try body(UnsafeRawBufferPointer(rebasing: buffer[0..<n]), offset)
            offset += UInt64(n)
        }
        return offset
    }

    /// Most symlinks followed while resolving one path (as Linux's MAXSYMLINKS).
    package static var maxSymlinkHops: Int { 40 }

    /// The node at absolute `path` ("/" is the root). Intermediate symlinks are followed
    /// (inside this file system; absolute targets start at its root), the last component is
    /// followed only when `followLast` is set. Throws `.notFound` naming the missing component.
    package func lookup(_ path: String, followLast: Bool = false) throws -> UInt64 {
        var hops = 0
        return try resolve(components: path.split(separator: "/").map(String.init), from: rootNode, parents: [],
                           followLast: followLast, hops: &hops, original: path)
    }

    private func resolve(components: [String], from start: UInt64, parents: [UInt64], followLast: Bool,
                         hops: inout Int, original: String) throws -> UInt64 {
        var node = start
        var stack = parents
        for (i, name) in components.enumerated() {
            if name == "." || name.isEmpty { continue }
            if name == ".." {
                node = stack.popLast() ?? rootNode
                continue
            }
            let entries = try directory(node)
            guard let entry = entries.first(where: { $0.name == name }) else {
                throw CairnError(.notFound, "no \"\(name)\" in \(original) (file system \(typeName) on \(volume.name))")
            }
            let isLast = i == components.count - 1
            let kind = try entry.kind ?? metadata(of: entry.node).kind
            if kind == .symlink && (!isLast || followLast) {
                hops += 1
                guard hops <= Self.maxSymlinkHops else {
                    throw CairnError(.malformedImage, "too many levels of symbolic links resolving \(original)")
                }
                let target = try readLink(entry.node)
                let targetParts = target.split(separator: "/").map(String.init)
                let base = target.hasPrefix("/") ? rootNode : node
                let baseParents = target.hasPrefix("/") ? [] : stack
                node = try resolve(components: targetParts, from: base, parents: baseParents, followLast: true,
                                   hops: &hops, original: original)
                // The parent chain after a jump is not tracked exactly; ".." from here goes to the root.
                stack = []
                continue
            }
            stack.append(node)
            node = entry.node
        }
        return node
    }

    /// Visits every entry below directory `node` depth first (entries of a directory in
    /// on-disk order), with its path relative to `prefix`. A directory reached twice (a
    /// looping or cross-linked tree) is reported once and not descended into again; the walk
    /// stops after `maxEntries` entries with an error (hostile trees cannot run forever).
    package func walk(from node: UInt64? = nil, prefix: String = "", maxEntries: Int = 50_000_000,
                      _ visit: (String, DirectoryEntry, FileMetadata) throws -> Void) throws {
        var seen: Set<UInt64> = []
        var count = 0
        var pending: [(UInt64, String)] = [(node ?? rootNode, prefix)]
        seen.insert(node ?? rootNode)
        while let (dir, path) = pending.popLast() {
            var subdirectories: [(UInt64, String)] = []
            for entry in try directory(dir) {
                count += 1
                guard count <= maxEntries else {
                    throw CairnError(.malformedImage, "more than \(maxEntries) entries in the \(typeName) tree on \(volume.name)")
                }
                let meta = try metadata(of: entry.node)
                let childPath = path + "/" + entry.name
                try visit(childPath, entry, meta)
                if meta.kind == .directory, seen.insert(entry.node).inserted {
                    subdirectories.append((entry.node, childPath))
                }
            }
            pending.append(contentsOf: subdirectories.reversed())
        }
    }
}
