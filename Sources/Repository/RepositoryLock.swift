import CairnCore
import Foundation
import RepositoryFormat
import Storage
#if canImport(Glibc)
import Glibc
#endif

/// A lock file in `locks/` (docs/FORMAT.md, "Locks").
///
/// Backups, restores and checks hold *shared* locks; garbage collection (and anything else
/// that deletes referenced data) holds an *exclusive* one. A lock is stale when its process is
/// gone (same host, no such pid) or its heartbeat is older than `staleAfter`.
package struct LockRecord: Codable, Sendable {
    package var version: Int
    package var kind: String
    package var host: String
    package var pid: Int32
    package var time: String
    package var heartbeat: String
    package var job: String

    package init(version: Int, kind: String, host: String, pid: Int32, time: String, heartbeat: String, job: String) {
        self.version = version; self.kind = kind; self.host = host; self.pid = pid
        self.time = time; self.heartbeat = heartbeat; self.job = job
    }
}

package final class RepositoryLock: @unchecked Sendable {
    package let id: String
    package let exclusive: Bool
    let repository: Repository
    private var released = false
    private var record: LockRecord
    private var timer: (any DispatchSourceTimer)?

    package static let staleAfter: TimeInterval = 30 * 60
    /// How often a held lock's heartbeat is rewritten (well within `staleAfter`).
    package static let heartbeatInterval: TimeInterval = 5 * 60

    init(id: String, exclusive: Bool, repository: Repository, record: LockRecord) {
        self.id = id
        self.exclusive = exclusive
        self.repository = repository
        self.record = record
    }

    func startHeartbeat() {
        let t = DispatchSource.makeTimerSource(queue: .global())
        t.schedule(deadline: .now() + RepositoryLock.heartbeatInterval, repeating: RepositoryLock.heartbeatInterval)
        t.setEventHandler { [weak self] in self?.refresh() }
        t.resume()
        timer = t
    }

    private let guardLock = NSLock()

    var recordTime: String { guardLock.withLock { record.time } }

    /// Rewrites the heartbeat if the last one is older than a minute (for a locker that waits).
    func touch() {
        let due = guardLock.withLock { parseTimestamp(record.heartbeat).map { Date().timeIntervalSince($0) > 60 } ?? true }
        if due { refresh() }
    }

    private func refresh() {
        guardLock.lock()
        defer { guardLock.unlock() }
        guard !released else { return }
        record.heartbeat = timestamp()
        if let data = try? JSONEncoder().encode(record) {
            try? repository.store.put(ObjectKey("locks", id), [UInt8](data))
        }
    }

    package func release() {
        guardLock.lock()
        defer { guardLock.unlock() }
        guard !released else { return }
        released = true
        timer?.cancel()
        // Chunks still waiting for their group commit get their names while the lock (and
        // with it the claim on this job's temporaries) still exists.
        try? repository.store.barrier()
        try? repository.store.delete(ObjectKey("locks", id))
        try? repository.store.barrier()
    }

    deinit { release() }
}

extension Repository {
    /// Lock records by id; unreadable ones are nil and treated as live and exclusive
    /// (conservative). A lock removed between listing and reading is simply gone.
    package func readLocks() throws -> [String: LockRecord?] {
        var out: [String: LockRecord?] = [:]
        for name in try store.list("locks") {
            let bytes: [UInt8]
            do {
                bytes = try store.get(ObjectKey("locks", name))
            } catch let e as CairnError where e.code == .notFound {
                continue
            }
            out[name] = try? JSONDecoder().decode(LockRecord.self, from: Data(bytes))
        }
        return out
    }

    package static func isStale(_ rec: LockRecord, now: Date = Date()) -> Bool {
        if rec.host == hostName() {
            if kill(rec.pid, 0) != 0 && errno == ESRCH { return true }
        }
        if let hb = parseTimestamp(rec.heartbeat), now.timeIntervalSince(hb) > RepositoryLock.staleAfter { return true }
        return false
    }

    /// Takes a lock, waiting up to `wait` seconds (default: the repository's `lockWait`) for
    /// conflicting locks to go away. Removes stale locks and the temporary files of dead writers
    /// on the way.
    ///
    /// Waiting follows docs/FORMAT.md ("Locks"): a shared locker that meets an exclusive lock
    /// withdraws its file and tries again later; an exclusive locker keeps its file while it
    /// waits for shared holders to finish, so new shared lockers stay out and it cannot starve.
    /// Of two exclusive lockers the later one (by time, then id) withdraws.
    package func lock(exclusive: Bool, job: String, wait: TimeInterval? = nil) throws -> RepositoryLock {
        var rnd = [UInt8](repeating: 0, count: 8)
        for i in rnd.indices { rnd[i] = UInt8.random(in: 0...255) }
        let id = hexString(rnd)
        // Temporary files of this process carry the lock id from the start.
        store.setTemporaryOwner(id)
        let deadline = Date().addingTimeInterval(max(0, wait ?? lockWait))
        var delay: TimeInterval = 0.05
        var written: RepositoryLock?
        while true {
            let lock: RepositoryLock
            if let written {
                lock = written
            } else {
                let now = timestamp()
                let rec = LockRecord(version: 1, kind: exclusive ? "exclusive" : "shared", host: hostName(), pid: getpid(),
                                     time: now, heartbeat: now, job: job)
                try store.put(ObjectKey("locks", id), [UInt8](try JSONEncoder().encode(rec)))
                try store.barrier()
                lock = RepositoryLock(id: id, exclusive: exclusive, repository: self, record: rec)
            }
            written = lock
            guard let (name, other) = try firstConflict(own: lock) else {
                _ = try store.removeStaleTemporaries { [self] in
                    Set(try readLocks().filter { name, rec in name == id || rec.map { !Repository.isStale($0) } ?? true }.keys)
                }
                lock.startHeartbeat()
                return lock
            }
            // An exclusive locker waits with its file in place, unless it yields to an earlier
            // exclusive one; everyone else withdraws while waiting.
            let keep = exclusive && other?.kind == "shared"
            if !keep {
                lock.release()
                written = nil
            }
            if Date() >= deadline {
                lock.release()
                let who = other.map { "\($0.kind) lock of \($0.job) by pid \($0.pid) on \($0.host) since \($0.time)" } ?? "an unreadable lock"
                throw CairnError(.locked, "repository is locked: \(who)", path: "\(path)/locks/\(name)",
                                 hint: "wait for that job to finish (--retry-lock DURATION waits); if it is dead, remove the lock file")
            }
            Thread.sleep(forTimeInterval: min(delay * Double.random(in: 0.5...1.5), max(0, deadline.timeIntervalSinceNow)))
            delay = min(delay * 2, 2)
            if keep { lock.touch() }
        }
    }

    /// The first live lock that conflicts with `own`, deleting stale ones met on the way.
    private func firstConflict(own: RepositoryLock) throws -> (String, LockRecord?)? {
        for (name, other) in try readLocks().sorted(by: { $0.key < $1.key }) where name != own.id {
            if let other, Repository.isStale(other) {
                try? store.delete(ObjectKey("locks", name))
                continue
            }
            let otherExclusive = other?.kind != "shared"
            if own.exclusive && otherExclusive, let other {
                // Two exclusive lockers: the earlier one (time, then id) goes on waiting.
                if (other.time, name) > (own.recordTime, own.id) { continue }
                return (name, other)
            }
            if own.exclusive || otherExclusive { return (name, other) }
        }
        return nil
    }
}
