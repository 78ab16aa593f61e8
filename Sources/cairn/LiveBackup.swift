import ArgumentParser
import CairnCore
import Engine
import Foundation
import Repository
import RepositoryFormat

/// The options of `cairn backup --qmp` (docs/LIVE-BACKUP.md).
struct LiveOptions: ParsableArguments {
    @Option(help: "QMP unix socket of a running QEMU (qemu-system or qemu-storage-daemon): back up its disks live.")
    var qmp: String?

    @Option(name: .customLong("guest-agent"), help: "Unix socket of the VM's guest agent channel: freeze the guest's file systems around the point in time (application consistency).")
    var guestAgent: String?

    @Flag(help: "Read every allocated block even when the dirty bitmaps can be trusted (starts a new change-tracking chain).")
    var full = false

    @Option(name: .customLong("node"), help: "A disk as NAME=NODE or NODE (a QMP block node name; repeatable). Default: every disk of the VM's devices.")
    var nodes: [String] = []

    @Option(name: .customLong("nbd-socket"), help: "The unix socket of an NBD server the VM already runs; Cairn adds its exports there instead of starting one.")
    var nbdSocket: String?

    @Option(name: .customLong("scratch-dir"), help: "Directory for the fleecing overlays (they hold the old data of blocks the guest overwrites during the backup).")
    var scratchDir = "/var/tmp"

    @Option(name: .customLong("cbt-sample"), help: "Share of the chunks the dirty bitmap calls unchanged that is read anyway and compared with the last snapshot (e.g. 1%, 0, 100%).")
    var cbtSample = "1%"

    @Option(name: .customLong("freeze-timeout"), help: "Seconds the guest may stay frozen; a watchdog thaws it after this even if Cairn dies.")
    var freezeTimeout: Double = 60

    @Option(name: .customLong("pre-hook"), help: "Shell command run before the point in time (before freezing); a failure aborts the backup.")
    var preHook: String?

    @Option(name: .customLong("post-hook"), help: "Shell command run after the point in time (after thawing).")
    var postHook: String?

    func sampleFraction() throws -> Double {
        var text = cbtSample.trimmingCharacters(in: .whitespaces)
        let percent = text.hasSuffix("%")
        if percent { text.removeLast() }
        guard let v = Double(text), v >= 0 else { throw ValidationError("--cbt-sample must be a share such as 1%, 0.5% or 0") }
        let f = percent ? v / 100 : v
        guard f <= 1 else { throw ValidationError("--cbt-sample must be at most 100%") }
        return f
    }

    func validateUnused() throws {
        if guestAgent != nil || full || !nodes.isEmpty || nbdSocket != nil || preHook != nil || postHook != nil {
            throw ValidationError("--guest-agent, --full, --node, --nbd-socket and the hooks need --qmp")
        }
    }

    func parsedNodes() -> [(name: String, node: String)] {
        nodes.map { n in
            if let eq = n.firstIndex(of: "="), eq != n.startIndex { return (String(n[..<eq]), String(n[n.index(after: eq)...])) }
            return (n, n)
        }
    }
}

extension Backup {
    func runLive(qmp: String) throws {
        var request = LiveBackupRequest(vm: vm, qmp: qmp)
        request.tags = tags
        request.guestAgent = live.guestAgent
        request.full = live.full
        request.nodes = live.parsedNodes()
        request.nbdSocket = live.nbdSocket
        request.scratchDir = live.scratchDir
        request.cbtSample = try live.sampleFraction()
        request.skipFreeSpace = !noSkipFree
        request.catalog = !noCatalog
        request.preHook = live.preHook
        request.postHook = live.postHook
        request.freezeTimeout = live.freezeTimeout
        let repo = try options.open()
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        let quiet = options.quiet
        let job = LiveBackupJob(repository: repo, request: request, progress: options.progress(), cancel: cancel,
                                workers: workers ?? defaultWorkerCount(), toolVersion: "cairn \(cairnVersion)",
                                log: { line in if !quiet { printError("cairn: \(line)") } })
        let started = Date()
        let snap: SnapshotEntry
        do {
            snap = try job.run()
        } catch {
            if !options.quiet { for w in job.warnings { printError("cairn: warning: \(w)") } }
            throw error
        }
        if !options.quiet { for w in job.warnings { printError("cairn: warning: \(w)") } }
        let seconds = Date().timeIntervalSince(started)
        if options.json {
            printJSONLine(["type": "summary", "id": snap.id.hex, "vm": vm, "seconds": seconds, "consistency": snap.manifest.consistency,
                           "disks": zip(snap.manifest.disks, job.outcomes).map { d, o in
                               ["name": d.name, "node": o.node, "size": d.virtualSize, "format": d.sourceFormat,
                                "read_mode": d.readMode ?? "", "note": d.readNote ?? "", "bitmap": d.cbtBitmap ?? "",
                                "dirty_bytes": o.dirtyBytes.map { $0 as Any } ?? NSNull(), "nbd_bytes_requested": o.bytesRequested,
                                "bytes_read": d.bytesRead, "bytes_new": d.bytesNew, "bytes_deduplicated": d.bytesDeduplicated,
                                "bytes_zero": d.bytesZero, "bytes_stored": d.bytesStored] as [String: Any]
                           }])
        } else {
            for d in snap.manifest.disks {
                print("disk \(d.name): \(ByteCount.format(d.virtualSize)) \(d.sourceFormat), \(d.readMode ?? "full") read \(ByteCount.format(d.bytesRead)), new \(ByteCount.format(d.bytesNew)), deduplicated \(ByteCount.format(d.bytesDeduplicated)), zero/unallocated \(ByteCount.format(d.bytesZero)), stored \(ByteCount.format(d.bytesStored))")
                if let n = d.readNote { print("  \(n)") }
            }
            print("snapshot \(snap.id.short) saved (\(snap.manifest.consistency)-consistent, \(String(format: "%.1f", seconds)) s)")
        }
    }
}
