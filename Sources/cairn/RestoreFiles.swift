import ArgumentParser
import CairnCore
import Engine
import Foundation
import GuestFS
import Repository
#if canImport(Glibc)
import Glibc
#endif

struct RestoreFiles: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore-files",
        abstract: "Restore files and directories from inside a snapshot's disk image into a local directory.",
        discussion: """
        Each PATH (as for `cairn ls`) is restored as DIR/<its last component>; directories with
        everything below them. Modes, times and symlinks are kept, hard links are linked again,
        owners are kept when run as root. Nothing outside DIR is ever written: names that are not
        plain file names are skipped, and no symlink is followed while restoring.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Argument(help: "SNAPSHOT[:DISK]")
    var snapshot: String

    @Argument(help: "Paths inside the disk.")
    var paths: [String]

    @Option(help: "Directory to restore into (created if missing).")
    var to: String

    @Flag(help: "Replace files that already exist in the target directory.")
    var overwrite = false

    func validate() throws {
        if paths.isEmpty { throw ValidationError("name at least one path to restore") }
    }

    /// One thing to create, in creation order (a directory before its contents).
    struct Item {
        var source: String
        var target: String
        var node: UInt64
        var meta: FileMetadata
        var fs: any FileSystem
    }

    func run() throws {
        let repo = try options.open()
        let lock = try repo.lock(exclusive: false, job: "restore-files")
        defer { lock.release() }
        let view = try SnapshotDiskRef(snapshot).open(repo, vm: vm)
        try FileManager.default.createDirectory(atPath: to, withIntermediateDirectories: true)
        var items: [Item] = []
        var skipped: [String] = []
        for p in paths {
            guard case .inVolume(let volume, let inner) = try view.locate(p) else {
                throw CairnError(.usage, "\(p) is a list of volumes; name a path inside one (for example \(p.hasSuffix("/") ? p : p + "/")etc)")
            }
            let fs = try GuestView.fileSystem(of: volume)
            let node = try fs.lookup(inner, followLast: false)
            let meta = try fs.metadata(of: node)
            var base = (inner as NSString).lastPathComponent
            if base.isEmpty || base == "/" { base = volume.name.isEmpty ? "root" : volume.name.replacingOccurrences(of: "/", with: "-") }
            let top = (to as NSString).appendingPathComponent(base)
            items.append(Item(source: p, target: top, node: node, meta: meta, fs: fs))
            if meta.kind == .directory {
                try fs.walk(from: node, prefix: "") { rel, entry, m in
                    // Every component must be a plain name: nothing may escape the target.
                    let name = entry.name
                    if name.isEmpty || name == "." || name == ".." || name.contains("/") || name.contains("\0") {
                        skipped.append("\(p)\(rel): not a plain file name")
                        return
                    }
                    items.append(Item(source: p + rel, target: top + rel, node: entry.node, meta: m, fs: fs))
                }
            }
        }
        let total = items.reduce(UInt64(0)) { $0 + ($1.meta.kind == .regular ? $1.meta.size : 0) }
        let progress = options.progress()
        let started = Date()
        var done: UInt64 = 0
        var lastReport = Date.distantPast
        var linked: [String: String] = [:]   // "fs identity/node" -> first target restored
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
        defer { buffer.deallocate() }
        var directories: [Item] = []
        for item in items {
            let key = "\(ObjectIdentifier(type(of: item.fs))):\(item.fs.uuid ?? ""):\(item.node)"
            if item.meta.kind == .regular, item.meta.linkCount > 1, let first = linked[key] {
                try prepare(item.target)
                guard link(first, item.target) == 0 else { throw posixError("cannot link \(item.target) to \(first)") }
                continue
            }
            try prepare(item.target)
            switch item.meta.kind {
            case .directory:
                if mkdir(item.target, 0o700) != 0 {
                    var st = stat()
                    guard errno == EEXIST, lstat(item.target, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
                        throw posixError("cannot create directory \(item.target)")
                    }
                }
                directories.append(item)
            case .regular:
                let fd = open(item.target, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
                guard fd >= 0 else { throw posixError("cannot create \(item.target)") }
                defer { close(fd) }
                try item.fs.forEachPiece(of: item.node, size: item.meta.size, buffer: buffer) { piece, offset in
                    // Only non-zero 4 KiB blocks are written: holes (and zeros) stay holes.
                    let n = piece.count
                    var block = 0
                    while block < n {
                        var end = block
                        while end < n && !isAllZero(UnsafeRawBufferPointer(rebasing: piece[end..<min(end + 4096, n)])) { end = min(end + 4096, n) }
                        if end > block {
                            var w = block
                            while w < end {
                                let r = pwrite(fd, piece.baseAddress! + w, end - w, off_t(offset) + off_t(w))
                                if r < 0 {
                                    if errno == EINTR { continue }
                                    throw posixError("cannot write \(item.target)")
                                }
                                w += r
                            }
                            block = end
                        } else {
                            block = min(block + 4096, n)
                        }
                    }
                    done += UInt64(n)
                    if Date().timeIntervalSince(lastReport) > 0.25 {
                        lastReport = Date()
                        progress.report(ProgressSnapshot(phase: "restore-files", doneBytes: done, totalBytes: total, readBytes: done,
                                                         elapsedSeconds: Date().timeIntervalSince(started)))
                    }
                }
                guard ftruncate(fd, off_t(item.meta.size)) == 0 else { throw posixError("cannot set the size of \(item.target)") }
                if item.meta.linkCount > 1 { linked[key] = item.target }
                try applyMetadata(item, fd: fd)
            case .symlink:
                let target = try item.fs.readLink(item.node)
                guard symlink(target, item.target) == 0 else { throw posixError("cannot create symlink \(item.target)") }
                try applyMetadata(item, fd: nil)
            case .fifo, .characterDevice, .blockDevice, .socket:
                let type: mode_t = switch item.meta.kind {
                case .fifo: S_IFIFO
                case .characterDevice: S_IFCHR
                case .blockDevice: S_IFBLK
                default: S_IFSOCK
                }
                if mknod(item.target, type | 0o600, dev_t(item.meta.device)) != 0 {
                    skipped.append("\(item.source): cannot create a \(item.meta.kind.rawValue) (\(String(cString: strerror(errno))))")
                    continue
                }
                try applyMetadata(item, fd: nil)
            case .other:
                skipped.append("\(item.source): unknown file type")
            }
        }
        // Directory modes and times last: writing their contents would change them.
        for d in directories.reversed() { try applyMetadata(d, fd: nil) }
        progress.finish(ProgressSnapshot(phase: "restore-files", doneBytes: total, totalBytes: total, readBytes: done,
                                         elapsedSeconds: Date().timeIntervalSince(started)))
        for s in skipped { printError("cairn: warning: skipped \(s)") }
        if options.json {
            printJSONLine(["type": "summary", "snapshot": view.snapshot.id.hex, "disk": view.disk.name, "items": items.count,
                           "bytes": total, "skipped": skipped.count, "target": to])
        } else if !options.quiet {
            print("restored \(items.count) item\(items.count == 1 ? "" : "s") (\(ByteCount.format(total))) from snapshot \(view.snapshot.id.short) disk \(view.disk.name) into \(to)")
        }
    }

    /// Makes room for `path`: an existing entry is an error unless --overwrite (then removed,
    /// unless it is a directory that a directory will reuse).
    private func prepare(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if st.st_mode & S_IFMT == S_IFDIR { return }
        guard overwrite else {
            throw CairnError(.usage, "\(path) already exists", hint: "pass --overwrite to replace it, or restore into an empty directory")
        }
        guard unlink(path) == 0 else { throw posixError("cannot replace \(path)") }
    }

    private func applyMetadata(_ item: Item, fd: Int32?) throws {
        let m = item.meta
        if geteuid() == 0 {
            _ = lchown(item.target, m.uid, m.gid)
        }
        if m.kind != .symlink {
            let mode = mode_t(m.permissions & 0o7777)
            let rc = fd.map { fchmod($0, mode) } ?? chmod(item.target, mode)
            guard rc == 0 else { throw posixError("cannot set the mode of \(item.target)") }
        }
        var times = [timespec(tv_sec: Int(m.accessed.seconds), tv_nsec: Int(m.accessed.nanoseconds)),
                     timespec(tv_sec: Int(m.modified.seconds), tv_nsec: Int(m.modified.nanoseconds))]
        guard utimensat(AT_FDCWD, item.target, &times, AT_SYMLINK_NOFOLLOW) == 0 else {
            throw posixError("cannot set the times of \(item.target)")
        }
    }
}

func posixError(_ what: String) -> CairnError {
    let code = errno
    return CairnError(code == ENOSPC ? .noSpace : .io, "\(what): \(String(cString: strerror(code)))")
}
