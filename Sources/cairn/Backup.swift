import ArgumentParser
import CairnCore
import DiskFormats
import Engine
import Foundation
import Repository
import RepositoryFormat

struct Backup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Back up VM disk images, or a running QEMU VM, into one snapshot.",
        discussion: """
        DISK is NAME=PATH or PATH (the disk is then named after its file name). Raw files, block devices, qcow2, VMDK (descriptor or sparse extent), VHD and VHDX images; the format is detected from the header unless --format is given.
        With --qmp SOCKET a running VM is backed up instead (no DISK arguments): a point-in-time image of all its disks, read over NBD, only the blocks changed since the last snapshot when QEMU's dirty bitmaps can be trusted (docs/LIVE-BACKUP.md).
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "Name of the VM the disks belong to.")
    var vm: String

    @Option(name: .customLong("tag"), help: "A tag for the snapshot (repeatable).")
    var tags: [String] = []

    @Option(help: "Force the image format of every disk (raw, qcow2, vmdk, vhd, vhdx); raw is never probed.")
    var format: String?

    @Option(name: .customLong("backing"), help: "Backing file (qcow2) or parent (VHD/VHDX differencing) of a disk, [DISK=]PATH, nearest first (repeatable). Never read from the image itself.")
    var backing: [String] = []

    @Option(help: "Worker threads (default: two per core).")
    var workers: Int?

    @Flag(help: "Read and store blocks the guest file systems mark free too (by default they are treated as zero).")
    var noSkipFree = false

    @Flag(help: "Do not walk the guest file systems to build the file catalog `cairn find` searches.")
    var noCatalog = false

    @OptionGroup(title: "Live backup of a running QEMU VM") var live: LiveOptions

    @Argument(help: "Disks: NAME=PATH or PATH.")
    var disks: [String] = []

    func validate() throws {
        if vm.isEmpty { throw ValidationError("--vm must not be empty") }
        if live.qmp == nil {
            if disks.isEmpty { throw ValidationError("name at least one disk (or --qmp SOCKET for a running VM)") }
            try live.validateUnused()
        } else {
            if !disks.isEmpty { throw ValidationError("with --qmp the disks come from the VM: use --node NAME=NODE to choose them, not DISK arguments") }
            if format != nil || !backing.isEmpty { throw ValidationError("--format and --backing apply to image files, not to --qmp") }
            _ = try live.sampleFraction()
        }
    }

    func run() throws {
        if let qmp = live.qmp {
            try runLive(qmp: qmp)
            return
        }
        var forced: ImageFormat?
        if let format {
            guard let f = ImageFormat(rawValue: format) else { throw CairnError(.usage, "unknown format '\(format)'", hint: "use raw, qcow2, vmdk, vhd or vhdx") }
            forced = f
        }
        var specs: [(name: String, path: String)] = []
        for d in disks {
            if let eq = d.firstIndex(of: "="), eq != d.startIndex {
                specs.append((String(d[..<eq]), String(d[d.index(after: eq)...])))
            } else {
                specs.append(((d as NSString).lastPathComponent, d))
            }
        }
        let names = specs.map(\.name)
        guard Set(names).count == names.count else { throw CairnError(.usage, "disk names must be unique: \(names.joined(separator: ", "))") }
        var chains: [String: [String]] = [:]
        for b in backing {
            if let eq = b.firstIndex(of: "="), names.contains(String(b[..<eq])) {
                chains[String(b[..<eq]), default: []].append(String(b[b.index(after: eq)...]))
            } else {
                guard specs.count == 1 else { throw CairnError(.usage, "with several disks, write --backing DISK=PATH") }
                chains[specs[0].name, default: []].append(b)
            }
        }
        var backupDisks: [BackupDisk] = []
        for s in specs {
            let img = try ImageOpener.open(path: s.path, format: forced, backing: chains[s.name] ?? [])
            backupDisks.append(BackupDisk(name: s.name, source: img.source, format: img.format.rawValue, path: s.path,
                                          skipFreeSpace: !noSkipFree, catalog: !noCatalog))
        }
        let repo = try options.open()
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        let job = BackupJob(repository: repo, vm: vm, tags: tags, disks: backupDisks, progress: options.progress(), cancel: cancel,
                            workers: workers ?? defaultWorkerCount(), toolVersion: "cairn \(cairnVersion)")
        let started = Date()
        let snap = try job.run()
        if !options.quiet { for w in job.warnings { printError("cairn: warning: \(w)") } }
        let seconds = Date().timeIntervalSince(started)
        if options.json {
            printJSONLine(["type": "summary", "id": snap.id.hex, "vm": vm, "seconds": seconds,
                           "disks": snap.manifest.disks.map { d in
                               ["name": d.name, "size": d.virtualSize, "format": d.sourceFormat, "bytes_read": d.bytesRead,
                                "bytes_new": d.bytesNew, "bytes_deduplicated": d.bytesDeduplicated, "bytes_zero": d.bytesZero,
                                "bytes_stored": d.bytesStored, "bytes_free": d.bytesFree ?? 0, "skip_free": d.skipFreeSpace ?? false,
                                "volumes": d.volumes ?? [], "catalog": d.catalog ?? ""] as [String: Any]
                           }])
        } else {
            for d in snap.manifest.disks {
                print("disk \(d.name): \(ByteCount.format(d.virtualSize)) \(d.sourceFormat), read \(ByteCount.format(d.bytesRead)), new \(ByteCount.format(d.bytesNew)), deduplicated \(ByteCount.format(d.bytesDeduplicated)), zero/unallocated \(ByteCount.format(d.bytesZero))\(d.bytesFree.map { " (of which free in the guest \(ByteCount.format($0)))" } ?? ""), stored \(ByteCount.format(d.bytesStored))")
                if let v = d.volumes, !v.isEmpty { print("  volumes: \(v.joined(separator: "; "))") }
            }
            print("snapshot \(snap.id.short) saved (\(String(format: "%.1f", seconds)) s)")
        }
    }
}
