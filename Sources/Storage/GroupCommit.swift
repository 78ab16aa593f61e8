import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// How a local store makes chunk files durable (docs/FORMAT.md, "Write order and atomicity").
///
/// - `file`: every chunk file is `fdatasync`ed before it is renamed to its name (one journal
///   commit per chunk).
/// - `filesystem`: chunk files are written, their write-back started, and renamed in groups
///   after one `syncfs` of the repository's file system made the whole group's data durable
///   (the `sync-level filesystem` of Proxmox Backup Server, but per group instead of once at the
///   end, so an interrupted backup still leaves what it stored). Used on file systems whose
///   `syncfs` is known to write data back (ext2/3/4, XFS, Btrfs, F2FS, ZFS, tmpfs);
///   anything else (NFS, FUSE, ...) gets `file`.
package enum SyncLevel: String, Sendable {
    case file, filesystem

    /// `CAIRN_SYNC=file|filesystem` overrides the choice made from the file system type.
    package static func choose(for path: String) -> SyncLevel {
        if let forced = ProcessInfo.processInfo.environment["CAIRN_SYNC"], let level = SyncLevel(rawValue: forced) {
            return level
        }
        guard let type = fileSystemType(of: path) else { return .file }
        let known: Set<UInt32> = [
            0xEF53,         // ext2, ext3, ext4
            0x5846_5342,    // xfs
            0x9123_683E,    // btrfs
            0xF2F5_2010,    // f2fs
            0x2FC1_2FC1,    // zfs
            0x0102_1994,    // tmpfs (nothing to make durable)
        ]
        return known.contains(type) ? .filesystem : .file
    }
}

/// Renames written-but-unsynced chunk files into place in groups, each group after one
/// `syncfs` (see `SyncLevel.filesystem`). A file is renamed only after its data is durable, so
/// a crash leaves whole chunks or temporaries, never a named chunk with missing data.
///
/// A group is committed when it holds `groupBytes`, when its oldest file waited `maxDelay`, or
/// when someone drains the queue (a barrier, or a read that must see every put). Producers
/// wait while `maxQueuedBytes` are queued.
final class GroupCommit: @unchecked Sendable {
    // @unchecked: every mutable field is guarded by `cond`.
    private struct Entry {
        var tmp: String
        var dest: String
        var dir: String
        var bytes: Int
    }

    static let groupBytes = 32 << 20
    static let maxQueuedBytes = 256 << 20
    static let maxDelay: TimeInterval = 0.1

    private let root: String
    private let cond = NSCondition()
    private var queue: [Entry] = []
    private var queuedBytes = 0
    private var oldest: Date?
    private var inFlight = 0
    private var urgent = false
    private var started = false
    private var failure: CairnError?
    /// Directories files were renamed into since the last `takeRenamedDirectories()`.
    private var renamedDirectories: Set<String> = []

    init(root: String) {
        self.root = root
    }

    /// The directories that got new names (the barrier fsyncs them), forgotten here.
    func takeRenamedDirectories() -> Set<String> {
        cond.lock()
        defer { cond.unlock() }
        let dirs = renamedDirectories
        renamedDirectories.removeAll()
        return dirs
    }

    /// Queues a written temporary for its rename. Throws (and removes the temporary) after an
    /// earlier group failed: nothing queued after a failure is ever named.
    func enqueue(tmp: String, dest: String, dir: String, bytes: Int) throws {
        cond.lock()
        defer { cond.unlock() }
        while failure == nil && queuedBytes >= GroupCommit.maxQueuedBytes {
            urgent = true
            cond.broadcast()
            cond.wait()
        }
        if let failure {
            unlink(tmp)
            throw failure
        }
        queue.append(Entry(tmp: tmp, dest: dest, dir: dir, bytes: bytes))
        queuedBytes += bytes
        if oldest == nil { oldest = Date() }
        if !started {
            started = true
            Thread.detachNewThread { [self] in run() }
        }
        cond.broadcast()
    }

    /// Waits until every file queued so far has its name; throws the failure of a group.
    func drain() throws {
        cond.lock()
        defer { cond.unlock() }
        while failure == nil && (!queue.isEmpty || inFlight > 0) {
            urgent = true
            cond.broadcast()
            cond.wait()
        }
        if let failure { throw failure }
    }

    var isIdle: Bool {
        cond.lock()
        defer { cond.unlock() }
        return queue.isEmpty && inFlight == 0
    }

    private func run() {
        cond.lock()
        while true {
            while queue.isEmpty { cond.wait() }
            // Let a group form, unless it is full or someone waits for it.
            while !urgent, queuedBytes < GroupCommit.groupBytes, let oldest,
                  Date().timeIntervalSince(oldest) < GroupCommit.maxDelay {
                _ = cond.wait(until: oldest.addingTimeInterval(GroupCommit.maxDelay))
            }
            let group = queue
            queue.removeAll(keepingCapacity: true)
            queuedBytes = 0
            oldest = nil
            urgent = false
            inFlight = group.count
            cond.broadcast()
            cond.unlock()
            let (error, dirs) = commit(group)
            cond.lock()
            renamedDirectories.formUnion(dirs)
            inFlight = 0
            if let error, failure == nil {
                failure = error
                // Nothing queued after a failed group gets a name either.
                for e in queue { unlink(e.tmp) }
                queue.removeAll()
                queuedBytes = 0
                oldest = nil
            }
            cond.broadcast()
        }
    }

    /// Makes the group's data durable, then names every file. On an error the remaining
    /// temporaries are removed and the error says which file and what to do.
    private func commit(_ group: [Entry]) -> (CairnError?, Set<String>) {
        do {
            try syncFileSystem(containing: root)
        } catch let e as CairnError {
            for entry in group { unlink(entry.tmp) }
            var e = e
            e.message = "making \(group.count) new chunk files durable: " + e.message
            return (e, [])
        } catch {
            for entry in group { unlink(entry.tmp) }
            return (CairnError(.io, "syncfs failed: \(error)", path: root), [])
        }
        var dirs: Set<String> = []
        for (i, entry) in group.enumerated() {
            if rename(entry.tmp, entry.dest) != 0 {
                let e = errno
                for rest in group[i...] { unlink(rest.tmp) }
                return (CairnError.errno("rename", e, path: entry.dest), dirs)
            }
            dirs.insert(entry.dir)
        }
        return (nil, dirs)
    }
}
