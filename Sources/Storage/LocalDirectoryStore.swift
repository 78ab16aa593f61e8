import CairnCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An `ObjectStore` in a local directory.
///
/// Layout: `<root>/<namespace>/<name>`, except chunks and indexes, which fan out into 256
/// subdirectories by the first two hex digits (`chunks/ab/abcd...`). Every put writes
/// `tmp/<owner>.<random>`, makes it durable, renames it into place; the directories touched
/// are fsynced at the next `barrier()`. A chunk is made durable by `fdatasync` or, at sync level
/// `filesystem`, by a group `syncfs` before its rename (`GroupCommit`). Temporary files carry the id of the lock of the process
/// that writes them, so a later process can remove those left by a dead one.
package final class LocalDirectoryStore: ObjectStore, @unchecked Sendable {
    // @unchecked: mutable state lives in Mutexes.
    package let root: String
    package var location: String { root }
    /// Prefix of temporary file names (the owner's lock id).
    private let tmpOwner = Mutex<String>("anon")
    private let dirtyDirectories = Mutex<Set<String>>([])
    private let createdDirectories = Mutex<Set<String>>([])
    /// Whether puts fdatasync file contents (off only for throwaway test stores).
    package let durable: Bool

    package static let fanOutNamespaces: Set<String> = ["chunks", "indexes"]

    /// Namespaces whose puts are committed in groups when the sync level is `filesystem`
    /// (the bulk of a backup's writes; see `GroupCommit`).
    package static let groupCommitNamespaces: Set<String> = ["chunks"]
    /// Chosen on the first grouped put, when the repository directory surely exists.
    private let chosenSyncLevel = Mutex<SyncLevel?>(nil)
    private let groups: GroupCommit

    /// `syncLevel` nil: chosen from the file system type (or `CAIRN_SYNC`) at the first put.
    package init(root: String, durable: Bool = true, syncLevel: SyncLevel? = nil) {
        self.root = root
        self.durable = durable
        chosenSyncLevel.withLock { $0 = syncLevel }
        groups = GroupCommit(root: root)
    }

    /// How chunk files are made durable here (`file` when the store is not durable at all).
    package var syncLevel: SyncLevel {
        guard durable else { return .file }
        return chosenSyncLevel.withLock { level in
            if let level { return level }
            let chosen = SyncLevel.choose(for: root)
            level = chosen
            return chosen
        }
    }

    package func setTemporaryOwner(_ owner: String) {
        tmpOwner.withLock { $0 = owner }
    }

    package func directory(for key: ObjectKey) -> String {
        if LocalDirectoryStore.fanOutNamespaces.contains(key.namespace), key.name.count >= 2 {
            return "\(root)/\(key.namespace)/\(key.name.prefix(2))"
        }
        return "\(root)/\(key.namespace)"
    }

    package func path(for key: ObjectKey) -> String { "\(directory(for: key))/\(key.name)" }

    private func ensureDirectory(_ dir: String) throws {
        if createdDirectories.withLock({ $0.contains(dir) }) { return }
        if mkdir(dir, 0o755) == 0 {
            // A new directory's entry lives in its parent: sync that at the next barrier.
            let parent = String(dir[..<(dir.lastIndex(of: "/") ?? dir.endIndex)])
            dirtyDirectories.withLock { _ = $0.insert(parent) }
        } else if errno != EEXIST {
            if errno == ENOENT {
                // Parent missing (a namespace directory): create it first.
                let parent = String(dir[..<(dir.lastIndex(of: "/") ?? dir.endIndex)])
                try ensureDirectory(parent)
                if mkdir(dir, 0o755) != 0 && errno != EEXIST { throw CairnError.errno("mkdir", errno, path: dir) }
                dirtyDirectories.withLock { _ = $0.insert(parent) }
            } else {
                throw CairnError.errno("mkdir", errno, path: dir)
            }
        }
        createdDirectories.withLock { _ = $0.insert(dir) }
    }

    /// Namespaces whose temporary files live beside them as dot files instead of in `tmp/`:
    /// a lock file is written before its owner exists, so `tmp/` cleanup must never see it.
    package static let inPlaceTemporaryNamespaces: Set<String> = ["locks"]

    package func put(_ key: ObjectKey, _ bytes: UnsafeRawBufferPointer) throws {
        let dir = directory(for: key)
        try ensureDirectory(dir)
        let tmp: String
        if LocalDirectoryStore.inPlaceTemporaryNamespaces.contains(key.namespace) {
            // Named after the object (a lock's id) and its writer (pid and host), so a leftover
            // can be told apart and, when its writer is gone, removed at once.
            tmp = "\(dir)/.tmp-\(key.name).\(WriterTag.current.text).\(UInt64.random(in: 0...UInt64.max))"
        } else {
            let tmpDir = "\(root)/tmp"
            try ensureDirectory(tmpDir)
            let owner = tmpOwner.withLock { $0 }
            tmp = "\(tmpDir)/\(owner).\(UInt64.random(in: 0...UInt64.max))"
        }
        let grouped = LocalDirectoryStore.groupCommitNamespaces.contains(key.namespace) && syncLevel == .filesystem
        let file = try PosixFile(path: tmp, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o444)
        do {
            try file.pwrite(bytes, at: 0)
            if grouped {
                file.startWriteback()
            } else if durable {
                try file.fdatasync()
            }
        } catch {
            unlink(tmp)
            throw error
        }
        let dest = "\(dir)/\(key.name)"
        if grouped {
            // Named by the group commit once a syncfs made its data durable.
            try groups.enqueue(tmp: tmp, dest: dest, dir: dir, bytes: bytes.count)
            return
        }
        guard rename(tmp, dest) == 0 else {
            let e = errno
            unlink(tmp)
            throw CairnError.errno("rename", e, path: dest)
        }
        dirtyDirectories.withLock { _ = $0.insert(dir) }
    }

    package func get(_ key: ObjectKey) throws -> [UInt8] {
        var buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 16)
        defer { buf.deallocate() }
        let n = try get(key, into: &buf)
        return Array(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
    }

    /// Starts reading the object's file into the page cache (asynchronous readahead).
    package func prefetch(_ key: ObjectKey) {
        let fd = open(path(for: key), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED)
        close(fd)
    }

    /// Reads see every put that returned: grouped puts not named yet are named first.
    private func settle(_ namespace: String) throws {
        if LocalDirectoryStore.groupCommitNamespaces.contains(namespace), !groups.isIdle { try groups.drain() }
    }

    package func get(_ key: ObjectKey, into buffer: inout UnsafeMutableRawBufferPointer) throws -> Int {
        try settle(key.namespace)
        let p = path(for: key)
        let fd = open(p, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { throw CairnError(.notFound, "\(key.namespace) object \(key.name) is missing", path: p) }
            throw CairnError.errno("open", errno, path: p)
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw CairnError.errno("fstat", errno, path: p) }
        let size = Int(st.st_size)
        if buffer.count < size {
            buffer.deallocate()
            buffer = .allocate(byteCount: size, alignment: 16)
        }
        var done = 0
        while done < size {
            let n = pread(fd, buffer.baseAddress! + done, size - done, off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw CairnError.errno("pread", errno, path: p, offset: UInt64(done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    package func exists(_ key: ObjectKey) throws -> Bool {
        try settle(key.namespace)
        return access(path(for: key), F_OK) == 0
    }

    package func size(_ key: ObjectKey) throws -> UInt64? {
        try settle(key.namespace)
        var st = stat()
        if stat(path(for: key), &st) != 0 {
            if errno == ENOENT { return nil }
            throw CairnError.errno("stat", errno, path: path(for: key))
        }
        return UInt64(st.st_size)
    }

    package func list(_ namespace: String) throws -> [String] {
        try settle(namespace)
        let base = "\(root)/\(namespace)"
        if LocalDirectoryStore.fanOutNamespaces.contains(namespace) {
            var out: [String] = []
            for sub in try listDirectory(base) where sub.count == 2 {
                out += try listDirectory("\(base)/\(sub)")
            }
            return out
        }
        return try listDirectory(base)
    }

    /// Entries of a directory except dot files; empty when it does not exist.
    package func listDirectory(_ path: String) throws -> [String] {
        try listDirectory(path) { !$0.hasPrefix(".") }
    }

    /// Entries of a directory that `keep` accepts; empty when it does not exist.
    private func listDirectory(_ path: String, keep: (String) -> Bool) throws -> [String] {
        guard let dir = opendir(path) else {
            if errno == ENOENT { return [] }
            throw CairnError.errno("opendir", errno, path: path)
        }
        defer { closedir(dir) }
        var out: [String] = []
        while let ent = readdir(dir) {
            let name = withUnsafePointer(to: ent.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if keep(name) { out.append(name) }
        }
        return out
    }

    package func delete(_ key: ObjectKey) throws {
        try settle(key.namespace)
        let p = path(for: key)
        if unlink(p) != 0 {
            if errno == ENOENT { return }   // nothing changed, nothing to make durable
            throw CairnError.errno("unlink", errno, path: p)
        }
        dirtyDirectories.withLock { _ = $0.insert(directory(for: key)) }
    }

    package func barrier() throws {
        // Grouped puts get their names first (their data is durable before they do).
        try groups.drain()
        let renamed = groups.takeRenamedDirectories()
        let dirs = dirtyDirectories.withLock { d -> Set<String> in
            let copy = d.union(renamed)
            d.removeAll()
            return copy
        }
        guard durable else { return }
        for d in dirs.sorted(by: { $0.count > $1.count }) {
            try fsyncDirectory(d)
        }
    }

    /// How old a lock's temporary (`locks/.tmp-<id>.<pid>-<host tag>.<random>`) must be before a
    /// process other than its writer may remove it when it cannot tell whether the writer still
    /// runs (another host, a reused pid, or an older name `.tmp-<id>.<random>`). It lives for the
    /// milliseconds between create and rename; the age keeps a locker from removing the
    /// temporary of a lock being taken right now, whose owner does not appear in `locks/` yet.
    package static let lockTemporaryMaxAge: Double = 10 * 60   // seconds

    /// Removes temporary files left by dead processes. Returns how many were removed.
    ///
    /// `tmp/` is listed *before* `liveOwners()` is asked: a process creates temporary files only
    /// after its lock exists, so every file in that listing whose owner is missing from the
    /// later lock listing belongs to a process that is gone (or has released its lock).
    /// Lock temporaries in `locks/` (left by a process killed while it wrote its lock file) are
    /// removed when their owner is not live and either their writer's pid is gone from this
    /// host or they are older than `lockTemporaryMaxAge`.
    @discardableResult
    package func removeStaleTemporaries(liveOwners: () throws -> Set<String>) throws -> Int {
        var removed = 0
        let names = try listDirectory("\(root)/tmp")
        let lockTemps = try listDirectory("\(root)/locks") { $0.hasPrefix(".tmp-") }
        if names.isEmpty && lockTemps.isEmpty { return 0 }
        let live = try liveOwners()
        for name in names {
            let owner = String(name.prefix(while: { $0 != "." }))
            if !live.contains(owner) {
                if unlink("\(root)/tmp/\(name)") == 0 { removed += 1 }
            }
        }
        let now = Double(time(nil))
        for name in lockTemps {
            let fields = name.dropFirst(".tmp-".count).split(separator: ".", omittingEmptySubsequences: false)
            let owner = String(fields[0])
            if live.contains(owner) { continue }
            let path = "\(root)/locks/\(name)"
            if fields.count == 3, let writer = WriterTag(fields[1]), writer.isDeadWriterOnThisHost {
                if unlink(path) == 0 { removed += 1 }
                continue
            }
            var st = stat()
            guard stat(path, &st) == 0 else { continue }
            let age = now - (Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9)
            if age > LocalDirectoryStore.lockTemporaryMaxAge, unlink(path) == 0 { removed += 1 }
        }
        return removed
    }
}
