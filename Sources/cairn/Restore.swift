import ArgumentParser
import CairnCore
import DiskFormats
import Engine
import Foundation
import Repository
import RepositoryFormat
#if canImport(Glibc)
import Glibc
#endif

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Restore a disk of a snapshot to a raw or qcow2 file, or onto an existing file or block device.",
        discussion: "SNAPSHOT is an id, a unique id prefix, or 'latest' (with --vm to pick a VM)."
    )

    @OptionGroup var options: RepositoryOptions

    @Argument(help: "Snapshot id, prefix or 'latest'.")
    var snapshot: String

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Option(help: "Disk to restore (needed when the snapshot has several).")
    var disk: String?

    @Option(help: "Target path: a new file, or an existing file/block device with --overwrite.")
    var to: String

    @Option(help: "raw (sparse), qcow2, vmdk, vhd (dynamic) or vhdx (dynamic); an existing target is written raw in place.")
    var format = "raw"

    @Option(help: "VMDK subformat: streamOptimized (default, what vSphere imports) or monolithicSparse.")
    var subformat: String?

    @Flag(help: "Write onto an existing file or block device.")
    var overwrite = false

    @Flag(help: "Do not fsync the target at the end (faster; a crash soon after the restore may lose part of it).")
    var noSync = false

    @Option(help: "Worker threads (default: four per core).")
    var workers: Int?

    func run() throws {
        guard let fmt = ImageFormat(rawValue: format) else {
            throw CairnError(.usage, "cannot restore to format '\(format)'", hint: "use raw, qcow2, vmdk, vhd or vhdx")
        }
        if let subformat, fmt != .vmdk {
            throw CairnError(.usage, "--subformat \(subformat) applies to --format vmdk only")
        }
        let vmdkSubformat = subformat ?? "streamOptimized"
        guard ["streamOptimized", "monolithicSparse"].contains(vmdkSubformat) else {
            throw CairnError(.usage, "unknown VMDK subformat '\(vmdkSubformat)'", hint: "use streamOptimized (what vSphere imports) or monolithicSparse")
        }
        let repo = try options.open()
        let codec = repo.makeCodec()
        let snap = try repo.resolveSnapshot(snapshot, vm: vm, codec: codec)
        let disks = snap.manifest.disks
        let chosen: Manifest.Disk
        if let disk {
            guard let d = disks.first(where: { $0.name == disk }) else {
                throw CairnError(.notFound, "snapshot \(snap.id.short) has no disk '\(disk)' (it has: \(disks.map(\.name).joined(separator: ", ")))")
            }
            chosen = d
        } else {
            guard disks.count == 1 else {
                throw CairnError(.usage, "snapshot \(snap.id.short) has \(disks.count) disks; choose one with --disk (\(disks.map(\.name).joined(separator: ", ")))")
            }
            chosen = disks[0]
        }
        let exists = access(to, F_OK) == 0
        if exists && !overwrite {
            throw CairnError(.usage, "target exists", path: to, hint: "pass --overwrite to write onto it in place, or choose a new path")
        }
        // Signals are caught before the target exists, so an interrupt always removes it.
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        let sink: any BlockSink
        if exists {
            sink = try FileBlockSink(path: to, size: chosen.virtualSize, create: false, durable: !noSync)
        } else if fmt == .raw {
            sink = try FileBlockSink(path: to, size: chosen.virtualSize, create: true, durable: !noSync)
        } else {
            let posix = try PosixFile(path: to, flags: O_RDWR | O_CREAT | O_EXCL)
            let file: any RandomAccessFile = noSync ? UnsyncedFile(posix) : posix
            do {
                switch fmt {
                case .qcow2: sink = try QCOW2Writer(file: file, virtualSize: chosen.virtualSize)
                case .vmdk where vmdkSubformat == "monolithicSparse": sink = try VMDKSparseWriter(file: file, virtualSize: chosen.virtualSize)
                case .vmdk: sink = try VMDKStreamOptimizedWriter(file: file, virtualSize: chosen.virtualSize)
                case .vhd: sink = try VHDDynamicWriter(file: file, virtualSize: chosen.virtualSize)
                case .vhdx: sink = try VHDXDynamicWriter(file: file, virtualSize: chosen.virtualSize)
                case .raw: fatalError("handled above")
                }
            } catch {
                unlink(to)
                throw error
            }
        }
        let started = Date()
        do {
            try RestoreJob(repository: repo, snapshot: snap, disk: chosen, sink: sink, progress: options.progress(), cancel: cancel,
                           workers: workers ?? defaultIOWorkerCount()).run()
        } catch {
            // A new file that failed half-way is removed; an existing target is left as is.
            if !exists { unlink(to) }
            throw error
        }
        let seconds = Date().timeIntervalSince(started)
        if options.json {
            printJSONLine(["type": "summary", "snapshot": snap.id.hex, "disk": chosen.name, "target": to, "format": exists ? "raw" : fmt.rawValue,
                           "size": chosen.virtualSize, "seconds": seconds])
        } else {
            print("restored disk \(chosen.name) of snapshot \(snap.id.short) to \(to) (\(exists ? "in place" : fmt.rawValue), \(ByteCount.format(chosen.virtualSize)), \(String(format: "%.1f", seconds)) s)")
        }
    }
}
