import ArgumentParser
import CairnCore
import Engine
import Foundation
import GuestFS
import Repository
import RepositoryFormat

/// `SNAPSHOT[:DISK]` as the file commands take it.
struct SnapshotDiskRef {
    var snapshot: String
    var disk: String?

    init(_ text: String) {
        if let colon = text.firstIndex(of: ":") {
            snapshot = String(text[..<colon])
            disk = String(text[text.index(after: colon)...])
        } else {
            snapshot = text
            disk = nil
        }
    }

    func open(_ repo: Repository, vm: String?) throws -> GuestView {
        let snap = try repo.resolveSnapshot(snapshot, vm: vm, codec: repo.makeCodec())
        return try GuestView(repository: repo, snapshot: snap, disk: GuestView.chooseDisk(snap, name: disk))
    }
}

/// `-rwxr-xr-x` from a kind and permission bits.
func modeString(_ kind: Character, _ p: UInt32) -> String {
    var s = String(kind)
    let bits: [(UInt32, Character)] = [(0o400, "r"), (0o200, "w"), (0o100, "x"), (0o040, "r"), (0o020, "w"), (0o010, "x"),
                                       (0o004, "r"), (0o002, "w"), (0o001, "x")]
    for (i, (bit, c)) in bits.enumerated() {
        var ch: Character = p & bit != 0 ? c : "-"
        if i == 2, p & 0o4000 != 0 { ch = p & bit != 0 ? "s" : "S" }
        if i == 5, p & 0o2000 != 0 { ch = p & bit != 0 ? "s" : "S" }
        if i == 8, p & 0o1000 != 0 { ch = p & bit != 0 ? "t" : "T" }
        s.append(ch)
    }
    return s
}

/// `2026-11-25 10:00:00` (UTC) from seconds since the epoch (no ICU formatter per file listed).
func timeString(_ seconds: Int64) -> String {
    String(Timestamp.format(secondsSince1970: Double(seconds)).prefix(19)).replacingOccurrences(of: "T", with: " ")
}

struct Ls: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls",
        abstract: "List files inside a snapshot's disk image, without restoring it.",
        discussion: """
        SNAPSHOT is an id, a unique prefix or 'latest' (with --vm), optionally followed by :DISK.
        Partitions (p1, p2, ...) and LVM volume groups (VG/LV) are the top-level entries; a disk
        that is a single file system without a partition table is listed from its root.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Flag(name: .short, help: "Long format: mode, owner, size, modification time (UTC), link target.")
    var long = false

    @Flag(name: .customShort("R"), help: "List subdirectories recursively.")
    var recursive = false

    @Argument(help: "SNAPSHOT[:DISK]")
    var snapshot: String

    @Argument(help: "Path inside the disk (default: /).")
    var path = "/"

    func run() throws {
        let repo = try options.open()
        let lock = try repo.lock(exclusive: false, job: "ls")
        defer { lock.release() }
        let view = try SnapshotDiskRef(snapshot).open(repo, vm: vm)
        for w in view.layout.warnings where !options.quiet { printError("cairn: warning: \(w)") }
        switch try view.locate(path) {
        case .volumes(let prefix):
            for v in view.layout.volumes where prefix.isEmpty || v.name.hasPrefix(prefix + "/") {
                let rest = prefix.isEmpty ? v.name : String(v.name.dropFirst(prefix.count + 1))
                let size = ByteCount.format(v.source.size)
                var what = v.content.summary
                if let fs = v.fileSystem, !fs.label.isEmpty { what += " \"\(fs.label)\"" }
                if options.json {
                    printJSONLine(["name": v.name, "type": what, "size": v.source.size])
                } else if long {
                    print("\(rest.padding(toLength: 16, withPad: " ", startingAt: 0)) \(size.padding(toLength: 10, withPad: " ", startingAt: 0)) \(what)")
                } else {
                    print(rest + "/")
                }
            }
        case .inVolume(let volume, let inner):
            let fs = try GuestView.fileSystem(of: volume)
            let prefix = view.isBareFileSystem ? "" : "/" + volume.name
            let node = try fs.lookup(inner, followLast: true)
            let meta = try fs.metadata(of: node)
            guard meta.kind == .directory else {
                try printEntry(fs, node: node, meta: meta, path: prefix + inner, name: (inner as NSString).lastPathComponent)
                return
            }
            if recursive {
                try fs.walk(from: node, prefix: inner == "/" ? "" : inner) { p, entry, m in
                    try printEntry(fs, node: entry.node, meta: m, path: prefix + p, name: prefix + p)
                }
            } else {
                for entry in try fs.directory(node) {
                    let m = try fs.metadata(of: entry.node)
                    try printEntry(fs, node: entry.node, meta: m, path: prefix + (inner == "/" ? "" : inner) + "/" + entry.name, name: entry.name)
                }
            }
        }
    }

    private func printEntry(_ fs: any FileSystem, node: UInt64, meta: FileMetadata, path: String, name: String) throws {
        let target = meta.kind == .symlink ? ((try? fs.readLink(node)) ?? "?") : nil
        if options.json {
            var o: [String: Any] = ["path": path, "type": meta.kind.rawValue, "mode": Int(meta.permissions), "uid": Int(meta.uid),
                                    "gid": Int(meta.gid), "size": meta.size, "mtime": meta.modified.seconds, "links": Int(meta.linkCount)]
            if let target { o["target"] = target }
            printJSONLine(o)
        } else if long {
            var line = "\(modeString(meta.kind.letter, meta.permissions)) \(String(meta.uid).leftPad(5)) \(String(meta.gid).leftPad(5)) "
            line += "\(String(meta.size).leftPad(12)) \(timeString(meta.modified.seconds)) \(name)"
            if let target { line += " -> \(target)" }
            print(line)
        } else {
            print(name + (meta.kind == .directory ? "/" : ""))
        }
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}

struct Cat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cat",
        abstract: "Write a file from inside a snapshot's disk image to standard output.",
        discussion: "SNAPSHOT[:DISK] and PATH as for `cairn ls` (for example: cairn cat latest --vm web /p1/etc/hosts)."
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Argument(help: "SNAPSHOT[:DISK]")
    var snapshot: String

    @Argument(help: "Path of the file inside the disk.")
    var path: String

    func run() throws {
        let repo = try options.open()
        let lock = try repo.lock(exclusive: false, job: "cat")
        defer { lock.release() }
        let view = try SnapshotDiskRef(snapshot).open(repo, vm: vm)
        guard case .inVolume(let volume, let inner) = try view.locate(path) else {
            throw CairnError(.usage, "\(path) is a list of volumes, not a file")
        }
        let fs = try GuestView.fileSystem(of: volume)
        let node = try fs.lookup(inner, followLast: true)
        let meta = try fs.metadata(of: node)
        guard meta.kind == .regular else { throw CairnError(.usage, "\(path) is a \(meta.kind.rawValue), not a regular file") }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
        defer { buffer.deallocate() }
        try fs.forEachPiece(of: node, size: meta.size, buffer: buffer) { piece, _ in
            try writeAll(1, piece, what: "standard output")
        }
    }
}

/// Writes all of `bytes` to file descriptor `fd`.
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, what: String) throws {
    var done = 0
    while done < bytes.count {
        let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
        if n < 0 {
            if errno == EINTR { continue }
            if errno == EPIPE { throw CairnError(.interrupted, "\(what) was closed") }
            throw CairnError(errno == ENOSPC ? .noSpace : .io, "cannot write \(what): \(String(cString: strerror(errno)))")
        }
        done += n
    }
}
