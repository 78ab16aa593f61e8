import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One disk to fleece, and what to do with its dirty bitmaps in the same transaction.
public struct FleeceRequest: Sendable {
    public var disk: LiveDisk
    /// Added in the transaction: records every write after the point in time.
    public var newBitmap: String
    public var persistent: Bool
    /// Disabled in the transaction (incremental): it then holds exactly the writes between the
    /// base snapshot and the point in time, and is exported with the image.
    public var frozenBitmap: String?

    public init(disk: LiveDisk, newBitmap: String, persistent: Bool, frozenBitmap: String?) {
        self.disk = disk; self.newBitmap = newBitmap; self.persistent = persistent; self.frozenBitmap = frozenBitmap
    }
}

/// A point-in-time image of a running VM's disks, exported over NBD (docs/LIVE-BACKUP.md).
///
/// `prepare` creates, per disk, an empty qcow2 overlay in the scratch directory and adds it as
/// a node whose backing is the live node. `snapshot` runs one QMP `transaction` over all disks:
/// add each new dirty bitmap, disable each frozen one, and start `blockdev-backup sync=none`
/// from the live node into the overlay (copy-before-write: a guest write first copies the old
/// data into the overlay). From that instant the overlay reads as the disk did at the
/// transaction, and the bitmaps agree with it exactly. `export` publishes each overlay (and its
/// frozen bitmap) read-only on QEMU's NBD server. `teardown` undoes everything it did, in
/// reverse, whatever state it stopped in; it never touches bitmaps (the caller decides between
/// commit and rollback).
public final class FleecingSession: @unchecked Sendable {
    // @unchecked: used from one thread.
    public let qmp: QMPClient
    public let requests: [FleeceRequest]
    public let scratchDir: String
    /// An NBD server QEMU already runs (its unix socket); nil to start one for this session.
    public let existingServer: String?
    public var qemuImg = "qemu-img"
    public var timeout: Double = 30

    private struct Item {
        var file: String
        var node: String
        var fileNode: String
        var job: String
        var export: String
        var fileCreated = false
        var nodeAdded = false
        var jobStarted = false
        var exported = false
    }
    private var items: [Item]
    private var serverStarted = false
    public private(set) var socketPath: String

    public init(qmp: QMPClient, requests: [FleeceRequest], scratchDir: String, existingServer: String? = nil) {
        self.qmp = qmp; self.requests = requests; self.scratchDir = scratchDir; self.existingServer = existingServer
        let token = String(UInt32.random(in: 0...UInt32.max), radix: 16)
        items = requests.indices.map { i in
            Item(file: "\(scratchDir)/cairn-fleece-\(token)-\(i).qcow2", node: "\(LiveVM.nodePrefix)\(token)-\(i)",
                 fileNode: "\(LiveVM.fileNodePrefix)\(token)-\(i)", job: "\(LiveVM.jobPrefix)\(token)-\(i)",
                 export: "\(LiveVM.exportPrefix)\(token)-\(i)")
        }
        socketPath = existingServer ?? "\(scratchDir)/cairn-nbd-\(token).sock"
    }

    /// The NBD export names, one per request, in order.
    public var exportNames: [String] { items.map(\.export) }

    /// Creates the overlays and adds them as nodes backed by the live nodes.
    public func prepare() throws {
        for i in items.indices {
            let size = requests[i].disk.virtualSize
            try createOverlay(items[i].file, size: size)
            items[i].fileCreated = true
            try qmp.execute("blockdev-add", arguments: [
                "node-name": items[i].node, "driver": "qcow2",
                "file": ["driver": "file", "filename": items[i].file, "node-name": items[i].fileNode] as [String: Any],
                "backing": requests[i].disk.node,
            ])
            items[i].nodeAdded = true
        }
    }

    /// The point in time: one transaction over every disk (bitmaps and copy-before-write).
    public func snapshot() throws {
        var actions: [[String: Any]] = []
        for (i, r) in requests.enumerated() {
            actions.append(["type": "block-dirty-bitmap-add",
                            "data": ["node": r.disk.node, "name": r.newBitmap, "persistent": r.persistent] as [String: Any]])
            if let frozen = r.frozenBitmap {
                actions.append(["type": "block-dirty-bitmap-disable", "data": ["node": r.disk.node, "name": frozen]])
            }
            actions.append(["type": "blockdev-backup",
                            "data": ["device": r.disk.node, "target": items[i].node, "sync": "none", "job-id": items[i].job] as [String: Any]])
        }
        try qmp.execute("transaction", arguments: ["actions": actions])
        for i in items.indices { items[i].jobStarted = true }
    }

    /// Publishes every overlay read-only over NBD (with its frozen bitmap).
    public func export() throws {
        if existingServer == nil {
            do {
                try qmp.execute("nbd-server-start", arguments: ["addr": ["type": "unix", "data": ["path": socketPath]]])
            } catch let e as CairnError where e.message.contains("already running") {
                throw CairnError(.unsupported, "this QEMU already runs an NBD server (\(e.message))", path: qmp.path,
                                 hint: "pass its unix socket with --nbd-socket PATH so Cairn adds its exports there")
            }
            serverStarted = true
        }
        for (i, r) in requests.enumerated() {
            var args: [String: Any] = ["type": "nbd", "id": items[i].export, "node-name": items[i].node,
                                       "name": items[i].export, "writable": false]
            if let frozen = r.frozenBitmap { args["bitmaps"] = [frozen] }
            try qmp.execute("block-export-add", arguments: args)
            items[i].exported = true
        }
    }

    /// Undoes whatever was done, in reverse; returns what could not be undone (one line each).
    public func teardown() -> [String] {
        let vm = LiveVM(qmp: qmp)
        var problems: [String] = []
        func attempt(_ what: String, _ body: () throws -> Void) {
            do { try body() } catch { problems.append("\(what): \(error)") }
        }
        for i in items.indices.reversed() where items[i].exported {
            attempt("removing NBD export \(items[i].export)") { try vm.deleteExport(items[i].export, timeout: timeout) }
            items[i].exported = false
        }
        if serverStarted {
            attempt("stopping the NBD server") { try qmp.execute("nbd-server-stop") }
            serverStarted = false
            unlink(socketPath)
        }
        for i in items.indices.reversed() where items[i].jobStarted {
            attempt("ending backup job \(items[i].job)") { try vm.cancelJob(items[i].job, timeout: timeout) }
            items[i].jobStarted = false
        }
        for i in items.indices.reversed() where items[i].nodeAdded {
            attempt("removing fleecing node \(items[i].node)") { try qmp.execute("blockdev-del", arguments: ["node-name": items[i].node]) }
            items[i].nodeAdded = false
        }
        for i in items.indices.reversed() where items[i].fileCreated {
            if unlink(items[i].file) != 0 && errno != ENOENT {
                problems.append("deleting \(items[i].file): \(String(cString: strerror(errno)))")
            }
            items[i].fileCreated = false
        }
        return problems
    }

    private func createOverlay(_ path: String, size: UInt64) throws {
        try DriveMirror.createQCOW2(path, size: size, qemuImg: qemuImg,
                                   hint: "check that the scratch directory is writable and has room (--scratch-dir)")
    }
}
