import ArgumentParser
import CairnCore
import Engine
import Foundation
import NBDServer
import QEMU
import Repository
#if canImport(Glibc)
import Glibc
#endif

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Export snapshot disks over NBD, read-only or writable through a copy-on-write overlay.",
        discussion: """
        Every disk of every SNAPSHOT becomes an export named <short id>-<disk>. Any NBD client
        can use them at once: qemu (-blockdev driver=nbd), qemu-img, nbdcopy, nbdinfo. With
        --writable, writes go to overlay files (kept in --overlay-dir and reused by the next
        serve of the same snapshot); the repository is never modified. Runs until interrupted.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Argument(help: "Snapshots (id, prefix or 'latest').")
    var snapshots: [String]

    @Option(help: "Unix socket to listen on.")
    var socket: String?

    @Option(help: "TCP address to listen on, HOST:PORT (default when no --socket: 127.0.0.1:10809).")
    var listen: String?

    @Flag(help: "Accept writes, into copy-on-write overlays.")
    var writable = false

    @Option(help: "Directory for overlay files (default: ./cairn-overlays).")
    var overlayDir = "cairn-overlays"

    func validate() throws {
        if snapshots.isEmpty { throw ValidationError("name at least one snapshot") }
    }

    func run() throws {
        let repo = try options.open()
        // A shared lock for as long as the exports live: gc cannot delete their chunks.
        let lock = try repo.lock(exclusive: false, job: "serve")
        defer { lock.release() }
        let codec = repo.makeCodec()
        let snaps = try snapshots.map { try repo.resolveSnapshot($0, vm: vm, codec: codec) }
        let set = try ExportSet.make(repository: repo, snapshots: snaps, writable: writable, overlayDirectory: overlayDir)
        defer { set.closeOverlays().forEach { printError("cairn: warning: \($0)") } }
        let server = NBDServer(exports: set.exports)
        defer { server.shutdown() }
        var uris: [String] = []
        if let socket {
            try server.listen(unixSocket: socket)
            uris = set.descriptions.map { "nbd+unix:///\($0.name)?socket=\(socket)" }
        }
        if listen != nil || socket == nil {
            let (host, port) = try parseHostPort(listen ?? "127.0.0.1:10809")
            let bound = try server.listen(host: host, port: port)
            uris += set.descriptions.map { "nbd://\(host.contains(":") ? "[\(host)]" : host):\(bound)/\($0.name)" }
        }
        for d in set.descriptions {
            print("export \(d.name): \(d.snapshot.manifest.vm) \(d.snapshot.manifest.time) disk \(d.disk), \(ByteCount.format(d.size))" +
                  (d.overlay.map { ", writes to \($0)" } ?? ", read-only"))
        }
        for u in uris { print(u) }
        print("serving; interrupt (Ctrl-C) to stop")
        fflush(nil)   // all streams: the URIs must reach a pipe before we sit waiting
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        while !cancel.isCancelled { usleep(100_000) }
    }
}

/// "HOST:PORT" or "[v6]:PORT".
func parseHostPort(_ s: String) throws -> (String, Int) {
    guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (0...65535).contains(port) else {
        throw CairnError(.usage, "cannot read the address '\(s)'", hint: "write HOST:PORT, for example 127.0.0.1:10809")
    }
    var host = String(s[..<colon])
    if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return (host.isEmpty ? "127.0.0.1" : host, port)
}

struct InstantRestore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "instant-restore",
        abstract: "Boot a VM straight from a snapshot: its disks are served over NBD with a copy-on-write overlay.",
        discussion: """
        Starts qemu-system-x86_64 on the snapshot's disks (the first one boots) without
        restoring them first. The guest's writes go to overlay files in --overlay-dir, which are
        kept for the next instant-restore of the same snapshot unless --discard-overlay. The
        repository is never modified. Ends when the VM powers off (or on Ctrl-C, which stops it).

        With --migrate-to, the disks are copied to local files while the VM runs (QMP
        blockdev-mirror, docs/QMP.md); once every disk is in sync the VM switches to the files
        without a reboot, and the NBD export is closed. The files include the guest's writes.
        If the migration fails, the files are removed and the VM keeps running from the backup.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Argument(help: "Snapshot (id, prefix or 'latest').")
    var snapshot: String

    @Option(help: "Guest memory in MiB (default: what a live backup recorded, else 1024).")
    var memory: Int?

    @Option(help: "kvm or tcg (default: kvm when /dev/kvm is usable, else tcg).")
    var accel: String?

    @Flag(help: "Connect the serial console to this terminal (otherwise it is written to <overlay-dir>/<snapshot>.serial.log).")
    var console = false

    @Option(help: "Directory for overlay files, the NBD socket and the serial log (default: ./cairn-overlays).")
    var overlayDir = "cairn-overlays"

    @Flag(help: "Remove the overlay files when the VM stops.")
    var discardOverlay = false

    @Flag(help: "No network device (default: user-mode networking with no inbound ports).")
    var noNetwork = false

    @Option(help: "Path of qemu-system-x86_64.")
    var qemu = "qemu-system-x86_64"

    @Option(help: ArgumentHelp("Move the running VM's disks to local storage: a directory (files <vm>-<disk>.<format> in it) or, for a one-disk snapshot, a file path.",
                               valueName: "dir|path"))
    var migrateTo: String?

    @Option(help: "Format of the migrated disks: qcow2 or raw.")
    var migrateFormat = "qcow2"

    func validate() throws {
        if MirrorFormat(rawValue: migrateFormat) == nil { throw ValidationError("--migrate-format must be qcow2 or raw") }
    }

    /// The file each disk moves to, checked before the VM starts.
    private func migrationTargets(_ snap: SnapshotEntry) throws -> [String] {
        guard let to = migrateTo else { return [] }
        let format = migrateFormat
        var isDir: ObjCBool = false
        let targets: [String]
        if FileManager.default.fileExists(atPath: to, isDirectory: &isDir), isDir.boolValue {
            let vmName = snap.manifest.vm.replacingOccurrences(of: "/", with: "_")
            targets = snap.manifest.disks.map { (to as NSString).appendingPathComponent("\(vmName)-\($0.name.replacingOccurrences(of: "/", with: "_")).\(format)") }
        } else {
            guard snap.manifest.disks.count == 1 else {
                throw CairnError(.usage, "snapshot \(snap.id.short) has \(snap.manifest.disks.count) disks: --migrate-to must be an existing directory", path: to)
            }
            targets = [to]
        }
        // Absolute, so QEMU (and whoever reads its query-block) sees the same file.
        let cwd = FileManager.default.currentDirectoryPath
        return try targets.map { t in
            let path = t.hasPrefix("/") ? t : ((cwd as NSString).appendingPathComponent(t) as NSString).standardizingPath
            try checkTarget(path)
            return path
        }
    }

    private func checkTarget(_ t: String) throws {
        if FileManager.default.fileExists(atPath: t) {
            throw CairnError(.usage, "the migration target exists; Cairn does not overwrite it", path: t, hint: "remove it or choose another path")
        }
        let parent = (t as NSString).deletingLastPathComponent
        if access(parent, W_OK) != 0 {
            throw CairnError.errno("write to the migration target's directory", errno, path: parent)
        }
    }

    func run() throws {
        let repo = try options.open()
        let lock = try repo.lock(exclusive: false, job: "instant-restore")
        defer { lock.release() }
        let snap = try repo.resolveSnapshot(snapshot, vm: vm, codec: repo.makeCodec())
        guard !snap.manifest.disks.isEmpty else { throw CairnError(.usage, "snapshot \(snap.id.short) has no disks") }
        let targets = try migrationTargets(snap)
        let set = try ExportSet.make(repository: repo, snapshots: [snap], writable: true, overlayDirectory: overlayDir)
        var discarded = false
        defer {
            set.closeOverlays().forEach { printError("cairn: warning: \($0)") }
            if discardOverlay && !discarded {
                set.removeOverlays()
                discarded = true
            }
        }
        let socket = (overlayDir as NSString).appendingPathComponent("\(snap.id.short).nbd.sock")
        unlink(socket)
        let server = NBDServer(exports: set.exports)
        defer {
            server.shutdown()
            unlink(socket)
        }
        try server.listen(unixSocket: socket)

        let accelerator = accel ?? (SandboxHost.kvmUsable() ? "kvm" : "tcg")
        guard ["kvm", "tcg"].contains(accelerator) else { throw CairnError(.usage, "--accel must be kvm or tcg") }
        let serialLog = (overlayDir as NSString).appendingPathComponent("\(snap.id.short).serial.log")
        let qmp = (overlayDir as NSString).appendingPathComponent("\(snap.id.short).qmp.sock")
        // The machine a live backup recorded (family, CPUs, memory); q35 with 1 GiB otherwise.
        let shape = VMShape(vmConfig: snap.manifest.vmConfig)
        var args = ["-accel", accelerator] + shape.qemuArguments(memoryOverride: memory)
        args += ["-nodefaults", "-display", "none", "-qmp", "unix:\(qmp),server=on,wait=off"]
        args += console ? ["-serial", "mon:stdio"] : ["-serial", "file:\(serialLog)"]
        args += noNetwork ? ["-nic", "none"] : ["-nic", "user,model=virtio-net-pci"]
        for (i, d) in set.descriptions.enumerated() {
            args += ["-blockdev", "driver=nbd,node-name=disk\(i),server.type=unix,server.path=\(socket),export=\(d.name)",
                     "-device", "virtio-blk-pci,drive=disk\(i)" + (i == 0 ? ",bootindex=0" : "")]
        }
        var recorded = shape.isEmpty ? "" : "; recorded VM: \(shape.summary)"
        if let memory, shape.memoryMiB != nil { recorded += " (--memory \(memory) MiB used)" }
        printError("cairn: booting snapshot \(snap.id.short) (\(snap.manifest.vm), \(snap.manifest.time)) with \(accelerator)" + recorded)
        printError("cairn: disks served from \(socket); QMP at \(qmp)" + (console ? "" : "; serial console in \(serialLog)"))
        for d in set.descriptions { printError("cairn: disk \(d.disk): writes go to \(d.overlay ?? "?")") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try findExecutable(qemu))
        p.arguments = args
        if !console { p.standardInput = FileHandle.nullDevice }
        try p.run()
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        var migrationError: (any Error)?
        if !targets.isEmpty {
            do {
                try migrate(qmp: qmp, targets: targets, set: set, qemu: p, cancel: cancel)
                // Nothing reads the export any more: close it and flush the overlays.
                server.shutdown()
                unlink(socket)
                set.closeOverlays().forEach { printError("cairn: warning: \($0)") }
                printError("cairn: migration done: the VM runs from \(targets.joined(separator: ", ")); the NBD export is closed" +
                           (discardOverlay ? "" : "; overlays kept in \(overlayDir)"))
            } catch {
                migrationError = error
                printError("cairn: \(error)")
            }
        }
        while p.isRunning {
            if cancel.isCancelled {
                // SIGTERM first (qemu then exits cleanly); SIGKILL if it is still there after 10 s.
                p.terminate()
                let deadline = Date().addingTimeInterval(10)
                while p.isRunning && Date() < deadline { usleep(50_000) }
                if p.isRunning { kill(p.processIdentifier, SIGKILL) }
                break
            }
            usleep(100_000)
        }
        p.waitUntilExit()
        printError("cairn: the VM stopped (qemu exit status \(p.terminationStatus))" +
                   (discardOverlay ? "; overlays discarded" : "; overlays kept in \(overlayDir)"))
        if p.terminationStatus != 0 && !cancel.isCancelled {
            throw CairnError(.io, "qemu-system-x86_64 exited with status \(p.terminationStatus)" + (console ? "" : " (see \(serialLog))"))
        }
        if let migrationError, !cancel.isCancelled {
            throw CairnError(.io, "the VM ran from the backup to the end: the migration had failed (\(migrationError))")
        }
    }

    /// Mirrors every disk (node diskN) to its target while the VM runs, then switches over.
    private func migrate(qmp path: String, targets: [String], set: ExportSet, qemu p: Process, cancel: CancellationToken) throws {
        let format = MirrorFormat(rawValue: migrateFormat) ?? .qcow2
        printError("cairn: migrating \(targets.count) disk\(targets.count == 1 ? "" : "s") to local storage (\(format.rawValue))")
        let client = try QMPClient.connect(path: path, timeout: 60)
        // The monitor serves one client at a time: let go of it when done.
        defer { client.close() }
        var mirror = DriveMirror(client: client, disks: targets.enumerated().map { i, t in
            MirrorDisk(node: "disk\(i)", target: t, format: format, label: "disk \(set.descriptions[i].disk)")
        })
        mirror.progress = { printError("cairn: \($0)") }
        mirror.shouldStop = { cancel.isCancelled || !p.isRunning }
        let outcomes = try mirror.run()
        for o in outcomes where !o.sourceRemoved {
            printError("cairn: warning: \(o.disk.label) still has its NBD node \(o.disk.node) attached; closing the export anyway")
        }
    }
}
