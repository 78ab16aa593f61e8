import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Image format of a mirror target.
public enum MirrorFormat: String, Sendable, CaseIterable {
    case raw, qcow2
}

/// One disk to move: the block node the VM's device reads now (an NBD client node for an
/// instant restore) and the local file it should run from afterwards.
public struct MirrorDisk: Sendable {
    public var node: String
    public var target: String
    public var format: MirrorFormat
    /// How progress lines and errors name the disk (default: the node name).
    public var label: String

    public init(node: String, target: String, format: MirrorFormat, label: String? = nil) {
        self.node = node
        self.target = target
        self.format = format
        self.label = label ?? node
    }
}

/// What happened to one disk.
public struct MirrorOutcome: Sendable {
    public var disk: MirrorDisk
    public var bytes: UInt64
    /// The node the device now uses (the target's format node).
    public var targetNode: String
    /// Whether the old source node was deleted (`blockdev-del`).
    public var sourceRemoved: Bool
}

/// Live migration of a running VM's disks to local files with QMP `blockdev-mirror`
/// (docs/QMP.md): create each target, add it as a node, mirror with sync=full, wait until
/// every job is in sync (READY), complete them all (the devices switch to the targets), then
/// delete the old source nodes. Any failure before the switch cancels every job, deletes the
/// target nodes and the target files Cairn created, and leaves the VM on its source disks.
public struct DriveMirror {
    public let client: QMPClient
    public var disks: [MirrorDisk]
    /// Bandwidth limit per job (bytes/s), nil for none.
    public var speed: UInt64?
    /// A job that makes no progress for this long is given up.
    public var stallTimeout: Double = 300
    /// Timeout of each QMP command and of the waits after complete/cancel.
    public var commandTimeout: Double = 60
    /// Delete the source nodes after the switch (the VM no longer needs them).
    public var removeSources = true
    /// qemu-img, for qcow2 targets.
    public var qemuImg = "qemu-img"
    /// Progress lines, at most one per job every `progressInterval` seconds, and each step.
    public var progress: (String) -> Void = { _ in }
    public var progressInterval: Double = 5
    /// Called once every job is in sync and before the switch; an error aborts (rollback).
    public var beforeSwitch: (() throws -> Void)?
    /// Polled while waiting; true aborts (rollback), for Ctrl-C or QEMU going away.
    public var shouldStop: () -> Bool = { false }

    public init(client: QMPClient, disks: [MirrorDisk]) {
        self.client = client
        self.disks = disks
    }

    private struct Job {
        var disk: MirrorDisk
        var size: UInt64
        var targetNode: String
        var jobID: String
        var createdFile = false
        var nodeAdded = false
        var started = false
        var finished = false
        var ready = false
        var switched = false
    }

    private static let jobEvents: Set<String> = ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"]

    /// Runs the whole migration; returns when every device runs from its target.
    @discardableResult
    public func run() throws -> [MirrorOutcome] {
        guard !disks.isEmpty else { return [] }
        let nodes = try namedNodes()
        var jobs: [Job] = []
        for (i, d) in disks.enumerated() {
            guard let size = nodes[d.node] else {
                throw CairnError(.notFound, "QEMU has no block node named '\(d.node)'", path: client.path)
            }
            // Node names are at most 31 characters: numbered, not derived from the source.
            let node = "cairn-mirror\(i)"
            guard nodes[node] == nil else {
                throw CairnError(.io, "QEMU already has a node named '\(node)' (left over from an earlier migration?)", path: client.path,
                                 hint: "remove it with blockdev-del or restart the VM")
            }
            if jobs.contains(where: { $0.disk.target == d.target }) {
                throw CairnError(.usage, "two disks cannot be migrated to the same file", path: d.target)
            }
            jobs.append(Job(disk: d, size: size, targetNode: node, jobID: "\(node)-job"))
        }
        do {
            for i in jobs.indices {
                try createTarget(&jobs[i])
            }
            for i in jobs.indices {
                try client.execute("blockdev-add", arguments: [
                    "driver": jobs[i].disk.format.rawValue, "node-name": jobs[i].targetNode,
                    "file": ["driver": "file", "filename": jobs[i].disk.target] as [String: Any],
                ], timeout: commandTimeout)
                jobs[i].nodeAdded = true
            }
            for i in jobs.indices {
                var args: [String: Any] = ["job-id": jobs[i].jobID, "device": jobs[i].disk.node, "target": jobs[i].targetNode, "sync": "full"]
                if let speed { args["speed"] = Int(speed) }
                try client.execute("blockdev-mirror", arguments: args, timeout: commandTimeout)
                jobs[i].started = true
                progress("mirroring \(jobs[i].disk.label) (\(ByteCount.format(jobs[i].size))) to \(jobs[i].disk.target) (\(jobs[i].disk.format.rawValue))")
            }
            try waitUntilReady(&jobs)
            progress("all disks in sync; switching over")
            try beforeSwitch?()
        } catch {
            throw rollback(jobs, error)
        }

        // The switch. job-complete per job; once one has switched there is no going back for
        // it (its device now writes only to the target).
        var failure: (any Error)?
        for i in jobs.indices {
            do {
                try client.execute("job-complete", arguments: ["id": jobs[i].jobID], timeout: commandTimeout)
                try waitFinished(jobs[i])
                jobs[i].finished = true
                jobs[i].switched = true
                progress("\(jobs[i].disk.label) now runs from \(jobs[i].disk.target)")
            } catch {
                failure = error
                break
            }
        }
        if let failure {
            let switched = jobs.filter(\.switched)
            if switched.isEmpty { throw rollback(jobs, failure) }
            // Some devices switched, some did not: undo only what has not switched.
            let rest = jobs.filter { !$0.switched }
            let cleaned = rollback(rest, failure)
            throw CairnError(.io, "the migration failed half-way: \(switched.map(\.disk.label).joined(separator: ", ")) switched to " +
                             "\(switched.map(\.disk.target).joined(separator: ", ")), the others stay on their sources: \(cleaned)",
                             path: client.path, hint: "keep the sources available until the VM stops")
        }

        var outcomes: [MirrorOutcome] = []
        for job in jobs {
            var removed = false
            if removeSources {
                do {
                    try client.execute("blockdev-del", arguments: ["node-name": job.disk.node], timeout: commandTimeout)
                    removed = true
                } catch {
                    progress("warning: the old node \(job.disk.node) of \(job.disk.label) could not be deleted (\(error)); the device no longer uses it")
                }
            }
            outcomes.append(MirrorOutcome(disk: job.disk, bytes: job.size, targetNode: job.targetNode, sourceRemoved: removed))
        }
        return outcomes
    }

    // MARK: - Steps

    /// node-name -> virtual size of every named node.
    private func namedNodes() throws -> [String: UInt64] {
        let list = try client.execute("query-named-block-nodes", arguments: ["flat": true], timeout: commandTimeout) as? [[String: Any]] ?? []
        var out: [String: UInt64] = [:]
        for n in list {
            guard let name = n["node-name"] as? String else { continue }
            let size = ((n["image"] as? [String: Any])?["virtual-size"] as? NSNumber)?.uint64Value ?? 0
            out[name] = size
        }
        return out
    }

    private func createTarget(_ job: inout Job) throws {
        let path = job.disk.target
        if access(path, F_OK) == 0 {
            throw CairnError(.usage, "the target exists; Cairn does not overwrite it", path: path, hint: "remove it or choose another path")
        }
        // Claim the name first (O_EXCL), so a file that appears meanwhile is never ours to delete.
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw CairnError.errno("create migration target", errno, path: path) }
        job.createdFile = true
        defer { _ = Glibc.close(fd) }
        switch job.disk.format {
        case .raw:
            if ftruncate(fd, off_t(job.size)) != 0 { throw CairnError.errno("ftruncate", errno, path: path) }
        case .qcow2:
            try Self.createQCOW2(path, size: job.size, qemuImg: qemuImg)
        }
    }

    private func waitUntilReady(_ jobs: inout [Job]) throws {
        var lastOffset: [String: (offset: UInt64, at: Date)] = [:]
        var lastReport = Date()
        let ids = Set(jobs.map(\.jobID))
        while jobs.contains(where: { !$0.ready }) {
            if shouldStop() { throw CairnError(.interrupted, "the migration was stopped") }
            if let e = try client.nextEvent(names: Self.jobEvents, timeout: 1, matching: { ids.contains($0.string("device") ?? "") }) {
                guard let i = jobs.firstIndex(where: { $0.jobID == e.string("device") }) else { continue }
                switch e.name {
                case "BLOCK_JOB_READY":
                    jobs[i].ready = true
                    progress("\(jobs[i].disk.label) is in sync with \(jobs[i].disk.target)")
                case "BLOCK_JOB_ERROR":
                    progress("\(jobs[i].disk.label): I/O error on the \(e.string("operation") ?? "?") side (\(e.string("action") ?? "?"))")
                default:
                    jobs[i].finished = true
                    throw CairnError(.io, "the mirror of \(jobs[i].disk.label) ended before it was in sync: \(e.string("error") ?? e.name)",
                                     path: jobs[i].disk.target)
                }
                continue
            }
            // No event this second: look at the jobs (progress, stalls, jobs that vanished).
            let list = try client.execute("query-block-jobs", timeout: commandTimeout) as? [[String: Any]] ?? []
            let now = Date()
            var lines: [String] = []
            for i in jobs.indices where !jobs[i].ready {
                guard let info = list.first(where: { ($0["device"] as? String) == jobs[i].jobID }) else {
                    // Gone without an event we saw: look once more for its final event.
                    if let e = try client.nextEvent(names: Self.jobEvents, timeout: 1, matching: { $0.string("device") == jobs[i].jobID }) {
                        if e.name == "BLOCK_JOB_READY" { jobs[i].ready = true; continue }
                        jobs[i].finished = true
                        throw CairnError(.io, "the mirror of \(jobs[i].disk.label) ended before it was in sync: \(e.string("error") ?? e.name)",
                                         path: jobs[i].disk.target)
                    }
                    jobs[i].finished = true
                    throw CairnError(.io, "the mirror job of \(jobs[i].disk.label) disappeared", path: jobs[i].disk.target)
                }
                let offset = (info["offset"] as? NSNumber)?.uint64Value ?? 0
                let len = (info["len"] as? NSNumber)?.uint64Value ?? 0
                if let previous = lastOffset[jobs[i].jobID], previous.offset == offset {
                    if now.timeIntervalSince(previous.at) > stallTimeout {
                        throw CairnError(.io, "the mirror of \(jobs[i].disk.label) made no progress for \(QMPClient.seconds(stallTimeout))",
                                         path: jobs[i].disk.target)
                    }
                } else {
                    lastOffset[jobs[i].jobID] = (offset, now)
                }
                let percent = len > 0 ? Int(Double(offset) / Double(len) * 100) : 0
                lines.append("\(jobs[i].disk.label) \(percent)% (\(ByteCount.format(offset)) of \(ByteCount.format(len)))")
            }
            if now.timeIntervalSince(lastReport) >= progressInterval && !lines.isEmpty {
                progress("mirroring: " + lines.joined(separator: ", "))
                lastReport = now
            }
        }
    }

    /// Waits for the job's BLOCK_JOB_COMPLETED after job-complete; an error in it, or a
    /// cancellation, throws.
    private func waitFinished(_ job: Job) throws {
        let limit = max(commandTimeout, stallTimeout)
        let deadline = Date().addingTimeInterval(limit)
        while true {
            if let e = try client.nextEvent(names: ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"], timeout: 1,
                                            matching: { $0.string("device") == job.jobID }) {
                if e.name == "BLOCK_JOB_CANCELLED" {
                    throw CairnError(.io, "the mirror of \(job.disk.label) was cancelled before the switch", path: job.disk.target)
                }
                if let error = e.string("error") {
                    throw CairnError(.io, "the mirror of \(job.disk.label) failed at the switch: \(error)", path: job.disk.target)
                }
                return
            }
            if Date() >= deadline {
                throw CairnError(.io, "the mirror of \(job.disk.label) did not finish within \(QMPClient.seconds(limit)) of job-complete",
                                 path: job.disk.target)
            }
        }
    }

    /// Undoes jobs that have not switched: cancel, wait for the end, delete the target node,
    /// remove the file. Returns the error to throw, naming anything that could not be undone.
    private func rollback(_ jobs: [Job], _ cause: any Error) -> any Error {
        var problems: [String] = []
        if client.isConnected {
            for job in jobs where job.started && !job.finished {
                do {
                    try client.execute("block-job-cancel", arguments: ["device": job.jobID, "force": true], timeout: commandTimeout)
                    let end = try client.nextEvent(names: ["BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"], timeout: commandTimeout,
                                                   matching: { $0.string("device") == job.jobID })
                    if end == nil { problems.append("job \(job.jobID) did not end after cancel") }
                } catch {
                    // The job may have ended on its own (its event then is already queued).
                    let list = (try? client.execute("query-block-jobs", timeout: commandTimeout)) as? [[String: Any]] ?? []
                    if list.contains(where: { ($0["device"] as? String) == job.jobID }) {
                        problems.append("job \(job.jobID) could not be cancelled: \(error)")
                    }
                }
            }
            for job in jobs where job.nodeAdded {
                do {
                    try client.execute("blockdev-del", arguments: ["node-name": job.targetNode], timeout: commandTimeout)
                } catch {
                    problems.append("node \(job.targetNode) could not be deleted: \(error)")
                }
            }
        }
        var removed: [String] = []
        for job in jobs where job.createdFile {
            if unlink(job.disk.target) == 0 || errno == ENOENT {
                removed.append(job.disk.target)
            } else {
                problems.append("\(job.disk.target) could not be removed: \(String(cString: strerror(errno)))")
            }
        }
        let detail = "the VM keeps running from its source disks" +
            (removed.isEmpty ? "" : "; removed \(removed.joined(separator: ", "))") +
            (problems.isEmpty ? "" : "; cleanup problems: \(problems.joined(separator: "; "))")
        if var e = cause as? CairnError {
            e.message = "migration failed: \(e.message); \(detail)"
            return e
        }
        return CairnError(.io, "migration failed: \(cause); \(detail)", path: client.path)
    }

    /// `qemu-img create -f qcow2 PATH SIZE` (the file may exist: it is overwritten).
    static func createQCOW2(_ path: String, size: UInt64, qemuImg: String, hint: String? = nil) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try findExecutable(qemuImg))
        p.arguments = ["create", "-q", "-f", "qcow2", path, "\(size)"]
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        let message = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        if p.terminationStatus != 0 {
            throw CairnError(.io, "qemu-img create failed: \(String(decoding: message, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))",
                             path: path, hint: hint)
        }
    }

    static func findExecutable(_ name: String) throws -> String {
        if name.contains("/") { return name }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if access(p, X_OK) == 0 { return p }
        }
        throw CairnError(.notFound, "\(name) is not installed", hint: "install the Debian package qemu-utils")
    }
}
