import CairnCore
import Foundation
import QEMU
import RepositoryFormat
import Repository

/// What to back up from a running QEMU and how (docs/LIVE-BACKUP.md).
package struct LiveBackupRequest: Sendable {
    package var vm: String
    package var tags: [String] = []
    /// QEMU's QMP unix socket.
    package var qmp: String
    /// The host end of the guest agent's channel; nil for crash consistency.
    package var guestAgent: String?
    /// Read every allocated block even when the dirty bitmap can be trusted.
    package var full = false
    /// Disks to back up as (name, block node); empty: every disk of the VM's devices.
    package var nodes: [(name: String, node: String)] = []
    /// An NBD server the VM already runs (unix socket); nil: Cairn starts and stops one.
    package var nbdSocket: String?
    /// Where the fleecing overlays live while the backup runs.
    package var scratchDir = "/var/tmp"
    package var cbtSample = 0.01
    package var skipFreeSpace = true
    package var catalog = true
    /// Shell commands run before the guest is frozen and after it is thawed.
    package var preHook: String?
    package var postHook: String?
    /// The guest is thawed by a watchdog process after this long even if Cairn dies frozen.
    package var freezeTimeout: Double = 60
    package var watchdogExecutable: String?

    package init(vm: String, qmp: String) { self.vm = vm; self.qmp = qmp }
}

/// How one disk was read, for the report.
package struct LiveDiskOutcome: Sendable {
    package var name: String
    package var node: String
    package var mode: String
    package var note: String?
    package var dirtyBytes: UInt64?
    package var bytesRequested: UInt64
}

/// A backup of a running VM: a point-in-time image of all its disks (fleecing, one QMP
/// transaction), read over NBD, only the blocks its dirty bitmaps mark changed when they can be
/// trusted, through the ordinary backup pipeline. QEMU is always left clean: exports, jobs,
/// nodes and overlay files are removed on success, error or interruption, and the bitmaps are
/// either advanced (success) or rolled back so they still cover everything since the last
/// snapshot (failure).
package final class LiveBackupJob: @unchecked Sendable {
    package let repository: Repository
    package let request: LiveBackupRequest
    package let progress: any ProgressReporter
    package let cancel: CancellationToken
    package let workers: Int
    package let toolVersion: String
    /// Step-by-step messages (cleanup of leftovers, freeze, fallbacks).
    package let log: @Sendable (String) -> Void
    package private(set) var warnings: [String] = []
    package private(set) var outcomes: [LiveDiskOutcome] = []
    package private(set) var consistency = "crash"

    package init(repository: Repository, request: LiveBackupRequest, progress: any ProgressReporter = SilentProgress(),
                 cancel: CancellationToken = CancellationToken(), workers: Int = defaultWorkerCount(), toolVersion: String,
                 log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.repository = repository; self.request = request; self.progress = progress; self.cancel = cancel
        self.workers = workers; self.toolVersion = toolVersion; self.log = log
    }

    /// Per disk: the decision made before the point in time.
    private struct DiskPlan {
        var disk: LiveDisk
        var mode: String
        var note: String?
        var base: SnapshotEntry?
        var baseIndex: DiskIndex?
        var frozenBitmap: String?
        var newBitmap: String
        var generation: Int
        var persistent: Bool
    }

    package var bitmapPrefix: String { "cairn-\(repository.config.id.prefix(8))-" }

    private func generation(_ name: String) -> Int? {
        guard name.hasPrefix(bitmapPrefix) else { return nil }
        return Int(name.dropFirst(bitmapPrefix.count))
    }

    package func run() throws -> SnapshotEntry {
        // Listing the stored chunks takes a while in a big repository: it runs while QEMU works.
        let repository = self.repository
        let listing = Background { try repository.listChunkIDs() }
        let qmp = try QMPClient.connect(path: request.qmp, timeout: 10, commandTimeout: 60)
        defer { qmp.close() }
        let vm = LiveVM(qmp: qmp)
        for line in try vm.removeLeftovers() { log(line) }
        Trace.mark("live: QMP connected, leftovers checked")

        let disks: [LiveDisk] = request.nodes.isEmpty
            ? try vm.disks()
            : try request.nodes.map { try vm.disk(node: $0.node, name: $0.name) }
        guard !disks.isEmpty else {
            throw CairnError(.usage, "the VM has no disks to back up", path: request.qmp, hint: "name block nodes with --node NAME=NODE")
        }
        guard Set(disks.map(\.name)).count == disks.count else {
            throw CairnError(.usage, "disk names must be unique: \(disks.map(\.name).joined(separator: ", "))")
        }

        let codec = repository.makeCodec()
        let history = try repository.listSnapshots(codec: codec).snapshots
            .filter { $0.manifest.vm == request.vm }
            .sorted { $0.date > $1.date }
        Trace.mark("live: \(disks.count) disks, \(history.count) earlier snapshots")
        let failed = try repository.failedSnapshots()
        var plans = try disks.map { try plan($0, history: history, failed: failed, vm: vm, codec: codec) }
        Trace.mark("live: planned (base indexes loaded, bitmaps reconciled)")
        for p in plans {
            log("disk \(p.disk.name) (node \(p.disk.node), \(p.disk.driver)): \(p.mode)\(p.note.map { " - \($0)" } ?? "")")
            if !p.persistent {
                warnings.append("disk \(p.disk.name) is \(p.disk.driver), not qcow2: its dirty bitmap lives only as long as this QEMU process; after a restart the next backup reads every block")
            }
        }

        let session = FleecingSession(qmp: qmp, requests: plans.map {
            FleeceRequest(disk: $0.disk, newBitmap: $0.newBitmap, persistent: $0.persistent, frozenBitmap: $0.frozenBitmap)
        }, scratchDir: request.scratchDir, existingServer: request.nbdSocket)
        var clients: [NBDClient] = []
        var pointInTime = false
        var succeeded = false
        defer {
            for c in clients { c.close() }
            for p in session.teardown() { warnings.append("cleanup: \(p)") }
            if pointInTime { finishBitmaps(plans, vm: vm, success: succeeded) }
        }

        try session.prepare()
        Trace.mark("live: fleecing overlays prepared")
        try cancel.check()
        pointInTime = try takePointInTime(session)
        Trace.mark("live: point in time taken")
        try cancel.check()
        try session.export()
        log("point in time taken (\(consistency)-consistent); reading over NBD at \(session.socketPath)")

        var backupDisks: [BackupDisk] = []
        for (i, p) in plans.enumerated() {
            var contexts = [NBDAllocation.contextName]
            if let frozen = p.frozenBitmap { contexts.append(NBDDirtyBitmap.contextPrefix + frozen) }
            let client = try NBDClient.connect(.unix(session.socketPath), export: session.exportNames[i], metaContexts: contexts)
            clients.append(client)
            guard client.size == p.disk.virtualSize else {
                throw CairnError(.io, "the fleecing export of disk \(p.disk.name) has \(client.size) bytes, the disk \(p.disk.virtualSize)", path: request.qmp)
            }
            var changed: [Range<UInt64>]?
            var dirtyBytes: UInt64?
            if let frozen = p.frozenBitmap {
                let ranges = try client.dirtyRanges(context: NBDDirtyBitmap.contextPrefix + frozen)
                let dirty = ranges.reduce(UInt64(0)) { $0 + ($1.upperBound - $1.lowerBound) }
                changed = ranges
                dirtyBytes = dirty
                plans[i].note = (plans[i].note.map { $0 + "; " } ?? "") + "\(frozen) marks \(ByteCount.format(dirty)) changed"
            }
            var d = BackupDisk(name: p.disk.name, source: client, format: p.disk.driver, path: "qmp:\(p.disk.node)",
                               changedRanges: changed, base: p.baseIndex,
                               skipFreeSpace: request.skipFreeSpace, catalog: request.catalog)
            d.cbtSample = request.cbtSample
            d.readMode = p.mode
            d.readNote = plans[i].note
            d.baseSnapshot = p.base?.id.hex
            d.cbtBitmap = p.newBitmap
            d.cbtGeneration = p.generation
            d.cbtNode = p.disk.node
            d.bytesRequested = { client.bytesRequested }
            backupDisks.append(d)
            outcomes.append(LiveDiskOutcome(name: p.disk.name, node: p.disk.node, mode: p.mode, note: plans[i].note,
                                            dirtyBytes: dirtyBytes, bytesRequested: 0))
        }
        Trace.mark("live: exports connected, dirty ranges read")
        let job = BackupJob(repository: repository, vm: request.vm, tags: request.tags, disks: backupDisks, progress: progress,
                            cancel: cancel, workers: workers, toolVersion: toolVersion)
        job.knownChunks = { try listing.get() }
        job.consistency = consistency
        job.source = "qmp:\(request.qmp)"
        job.vmConfig = vm.configuration(disks: disks)
        let snap = try job.run()
        warnings += job.warnings
        for (i, d) in snap.manifest.disks.enumerated() where i < outcomes.count {
            outcomes[i].mode = d.readMode ?? outcomes[i].mode
            outcomes[i].note = d.readNote
            outcomes[i].bytesRequested = clients[i].bytesRequested
        }
        succeeded = true
        return snap
    }

    /// Decides how a disk is read and reconciles its bitmaps with the last snapshot.
    private func plan(_ disk: LiveDisk, history: [SnapshotEntry], failed: Set<String>, vm: LiveVM, codec: ObjectCodec) throws -> DiskPlan {
        let ours = disk.bitmaps.filter { generation($0.name) != nil }
        let withDisk = history.filter { $0.manifest.disks.contains { $0.name == disk.name } }
        // A snapshot that failed verification is never a base (docs/VERIFY.md): the next backup heals.
        let base = withDisk.first { !failed.contains($0.id.hex) }
        let failedNewest = withDisk.first.flatMap { failed.contains($0.id.hex) ? $0 : nil }
        let baseDisk = base?.manifest.disks.first { $0.name == disk.name }
        let recorded = baseDisk?.cbtBitmap
        let maxGen = max(ours.compactMap { generation($0.name) }.max() ?? 0, baseDisk?.cbtGeneration ?? 0)
        let next = maxGen + 1
        var p = DiskPlan(disk: disk, mode: "full", note: nil, base: base, baseIndex: nil, frozenBitmap: nil,
                         newBitmap: "\(bitmapPrefix)\(next)", generation: next, persistent: disk.driver == "qcow2")

        func untrusted(_ why: String) throws -> DiskPlan {
            // Every bitmap of ours goes: the new one starts the chain again.
            for b in ours where !b.busy { try vm.removeBitmap(node: disk.node, name: b.name) }
            p.mode = base == nil || request.full ? "full" : "hash-scan"
            p.note = why
            return p
        }
        if request.full { return try untrusted("--full: every allocated block read") }
        if let failedNewest {
            return try untrusted("the last snapshot \(failedNewest.id.short) failed verification, so it is not a base: every allocated block read and compared by content")
        }
        guard let base, let baseDisk else { return try untrusted("first backup of this disk") }
        guard let recorded, let recordedGen = generation(recorded) else {
            return try untrusted("the last snapshot \(base.id.short) has no dirty bitmap of this repository (not a live backup)")
        }
        guard let current = ours.first(where: { $0.name == recorded }) else {
            return try untrusted("dirty bitmap \(recorded) of the last snapshot \(base.id.short) is gone from node \(disk.node) (deleted, or QEMU restarted and the bitmap was not persistent): every allocated block read and compared by content")
        }
        if current.inconsistent {
            return try untrusted("dirty bitmap \(recorded) is marked inconsistent by QEMU (it was not saved cleanly): every allocated block read")
        }
        if current.busy {
            return try untrusted("dirty bitmap \(recorded) is in use by another job or export")
        }
        let newer = ours.filter { (generation($0.name) ?? 0) > recordedGen }.map(\.name)
        let older = ours.filter { (generation($0.name) ?? 0) < recordedGen }.map(\.name)
        if !current.recording && newer.isEmpty {
            return try untrusted("dirty bitmap \(recorded) was disabled outside Cairn, so writes may be missing from it: every allocated block read")
        }
        guard baseDisk.virtualSize == disk.virtualSize else {
            return try untrusted("the disk's size changed since the last snapshot (\(baseDisk.virtualSize) -> \(disk.virtualSize))")
        }
        guard let indexID = CairnCore.Digest(hex: baseDisk.index) else {
            return try untrusted("the last snapshot's index id is malformed")
        }
        let index = try repository.loadIndex(indexID, codec: codec)
        guard index.chunkSize == repository.chunkSize else {
            return try untrusted("the last snapshot was made with another chunk size")
        }
        // A killed run left the recorded bitmap disabled and a newer one recording: fold the
        // newer one back in so the recorded one again holds every write since its snapshot.
        if !newer.isEmpty || !current.recording {
            try vm.mergeBitmaps(node: disk.node, into: recorded, from: newer)
            log("disk \(disk.name): bitmap \(recorded) re-enabled\(newer.isEmpty ? "" : " with \(newer.joined(separator: ", ")) merged into it") (an earlier run did not finish)")
        }
        for b in older { try vm.removeBitmap(node: disk.node, name: b) }
        p.mode = "cbt"
        p.frozenBitmap = recorded
        p.baseIndex = index
        return p
    }

    /// Hooks, freeze, the transaction, thaw. Returns true once the transaction has run.
    private func takePointInTime(_ session: FleecingSession) throws -> Bool {
        if let hook = request.preHook { try runHook(hook, phase: "pre") }
        var agent: GuestAgentClient?
        var watchdog: ThawWatchdog?
        var frozen = false
        if let path = request.guestAgent {
            do {
                let a = try GuestAgentClient.connect(path: path, timeout: 10)
                agent = a
                try a.ping(timeout: 10)
                watchdog = try ThawWatchdog.spawn(agentSocket: path, after: request.freezeTimeout, executable: request.watchdogExecutable)
                let n = try a.freeze(timeout: request.freezeTimeout)
                frozen = true
                log("guest file systems frozen (\(n))")
            } catch {
                warnings.append("guest agent: \(error); the snapshot is crash-consistent")
                if let a = agent, (try? a.fsfreezeStatus(timeout: 5)) == "frozen" { _ = try? a.thaw(timeout: 30) }
                watchdog?.cancel()
                watchdog = nil
            }
        }
        var thawError: (any Error)?
        do {
            defer {
                if frozen, let agent {
                    do { try agent.thaw(timeout: 30); log("guest file systems thawed") } catch { thawError = error }
                }
                if thawError == nil { watchdog?.cancel() }
                agent?.close()
            }
            try session.snapshot()
        }
        if let thawError {
            warnings.append("guest agent: thaw failed (\(thawError)); the watchdog thaws the guest within \(Int(request.freezeTimeout)) s")
        }
        consistency = frozen && thawError == nil ? "application" : "crash"
        if let hook = request.postHook {
            do { try runHook(hook, phase: "post") } catch { warnings.append("post hook: \(error)") }
        }
        return true
    }

    /// After the backup: on success the frozen bitmaps are done with (the new ones carry on);
    /// on failure each frozen bitmap takes the new one's writes back and records again, so the
    /// last snapshot's bitmap still covers every write since it; new bitmaps of disks read in
    /// full are simply dropped (the next run reads them in full again).
    private func finishBitmaps(_ plans: [DiskPlan], vm: LiveVM, success: Bool) {
        for p in plans {
            do {
                if success {
                    if let frozen = p.frozenBitmap { try vm.removeBitmap(node: p.disk.node, name: frozen) }
                } else if let frozen = p.frozenBitmap {
                    try vm.mergeBitmaps(node: p.disk.node, into: frozen, from: [p.newBitmap])
                } else {
                    try vm.removeBitmap(node: p.disk.node, name: p.newBitmap)
                }
            } catch {
                warnings.append("disk \(p.disk.name): bitmaps not \(success ? "advanced" : "rolled back") (\(error)); the next backup sorts them out")
            }
        }
    }

    private func runHook(_ command: String, phase: String) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        var env = ProcessInfo.processInfo.environment
        env["CAIRN_VM"] = request.vm
        env["CAIRN_HOOK"] = phase
        p.environment = env
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw CairnError(.io, "\(phase) hook `\(command)` exited with status \(p.terminationStatus)", hint: "the backup was not taken; fix the hook or drop --\(phase)-hook")
        }
    }
}

/// The chunk list being read on another thread: `result` is written once, before `done` is
/// left, and read only after waiting for `done`.
