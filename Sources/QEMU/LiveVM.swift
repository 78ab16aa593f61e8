import CairnCore
import Foundation

/// A dirty bitmap on a block node, as `query-named-block-nodes` reports it.
public struct DirtyBitmapInfo: Sendable, Equatable {
    public var name: String
    public var recording: Bool
    public var busy: Bool
    public var persistent: Bool
    public var inconsistent: Bool
    public var granularity: UInt64
    public var count: UInt64
}

/// One disk of a running VM: the block node its device reads (the top of its chain).
public struct LiveDisk: Sendable, Equatable {
    /// The disk's name in snapshots: the device id (`virtio-disk0`, `drive0`) or the node name.
    public var name: String
    public var node: String
    /// Format driver of the node (`qcow2`, `raw`, ...). Persistent bitmaps need qcow2.
    public var driver: String
    public var virtualSize: UInt64
    /// Image file of the node, when it has one.
    public var filename: String?
    public var readOnly: Bool
    public var bitmaps: [DirtyBitmapInfo]
}

/// What Cairn asks of a running QEMU through QMP besides the fleecing itself: which disks it
/// has, their bitmaps, a description of the VM, and removing what an earlier, killed run left.
///
/// Every object Cairn creates inside QEMU carries a prefix so that it can be recognised later:
/// fleecing nodes `cairn-f-`, backup jobs `cairn-j-`, NBD exports `cairn-e-`, dirty bitmaps
/// `cairn-<repository id>-<generation>` (docs/LIVE-BACKUP.md).
public struct LiveVM {
    public let qmp: QMPClient
    public static let nodePrefix = "cairn-f-"
    public static let fileNodePrefix = "cairn-fp-"
    public static let jobPrefix = "cairn-j-"
    public static let exportPrefix = "cairn-e-"

    public init(qmp: QMPClient) { self.qmp = qmp }

    // MARK: - Disks

    /// Every block node by name (`query-named-block-nodes`, flat).
    func namedNodes() throws -> [[String: Any]] {
        guard let nodes = try qmp.execute("query-named-block-nodes", arguments: ["flat": true]) as? [[String: Any]] else {
            throw CairnError(.io, "QMP query-named-block-nodes: unexpected reply", path: qmp.path)
        }
        return nodes
    }

    /// The disks of the VM's devices (`query-block`): every device with a medium, except
    /// removable read-only media (CD-ROMs).
    public func disks() throws -> [LiveDisk] {
        guard let devices = try qmp.execute("query-block") as? [[String: Any]] else {
            throw CairnError(.io, "QMP query-block: unexpected reply", path: qmp.path)
        }
        let nodes = try namedNodes()
        var out: [LiveDisk] = []
        for dev in devices {
            guard let inserted = dev["inserted"] as? [String: Any], let node = inserted["node-name"] as? String else { continue }
            let ro = inserted["ro"] as? Bool ?? false
            if ro && (dev["removable"] as? Bool ?? false) { continue }
            var name = dev["device"] as? String ?? ""
            if name.isEmpty, let qdev = dev["qdev"] as? String {
                // "/machine/peripheral/virtio-disk0/virtio-backend" -> "virtio-disk0"
                let parts = qdev.split(separator: "/")
                if parts.count >= 3, parts[1] == "peripheral" { name = String(parts[2]) }
            }
            if name.isEmpty { name = node }
            out.append(try disk(node: node, name: name, nodes: nodes))
        }
        return out
    }

    /// The disk for block node `node` (for QEMU processes without devices, such as
    /// qemu-storage-daemon).
    public func disk(node: String, name: String) throws -> LiveDisk {
        try disk(node: node, name: name, nodes: namedNodes())
    }

    private func disk(node: String, name: String, nodes: [[String: Any]]) throws -> LiveDisk {
        guard let n = nodes.first(where: { $0["node-name"] as? String == node }) else {
            throw CairnError(.notFound, "QEMU has no block node '\(node)'", path: qmp.path,
                             hint: "list them with QMP query-named-block-nodes")
        }
        let image = n["image"] as? [String: Any] ?? [:]
        let size = (image["virtual-size"] as? NSNumber)?.uint64Value ?? 0
        var filename = n["file"] as? String
        if let f = filename, f.hasPrefix("json:") || f.hasPrefix("nbd") { filename = nil }
        let bitmaps = (n["dirty-bitmaps"] as? [[String: Any]] ?? []).map { b in
            DirtyBitmapInfo(name: b["name"] as? String ?? "", recording: b["recording"] as? Bool ?? false,
                            busy: b["busy"] as? Bool ?? false, persistent: b["persistent"] as? Bool ?? false,
                            inconsistent: b["inconsistent"] as? Bool ?? false,
                            granularity: (b["granularity"] as? NSNumber)?.uint64Value ?? 0,
                            count: (b["count"] as? NSNumber)?.uint64Value ?? 0)
        }
        return LiveDisk(name: name, node: node, driver: n["drv"] as? String ?? "?", virtualSize: size, filename: filename,
                        readOnly: n["ro"] as? Bool ?? false, bitmaps: bitmaps)
    }

    // MARK: - Bitmaps

    public func addBitmap(node: String, name: String, persistent: Bool) throws {
        try qmp.execute("block-dirty-bitmap-add", arguments: ["node": node, "name": name, "persistent": persistent])
    }

    public func removeBitmap(node: String, name: String) throws {
        try qmp.execute("block-dirty-bitmap-remove", arguments: ["node": node, "name": name])
    }

    /// Folds the bitmaps `from` into `into`, re-enables `into` and removes `from`, atomically:
    /// `into` then records every write since its own start again.
    public func mergeBitmaps(node: String, into: String, from: [String]) throws {
        var actions: [[String: Any]] = [["type": "block-dirty-bitmap-enable", "data": ["node": node, "name": into]]]
        if !from.isEmpty {
            actions.append(["type": "block-dirty-bitmap-merge", "data": ["node": node, "target": into, "bitmaps": from]])
            for b in from { actions.append(["type": "block-dirty-bitmap-remove", "data": ["node": node, "name": b]]) }
        }
        try qmp.execute("transaction", arguments: ["actions": actions])
    }

    // MARK: - Leftovers of killed runs

    /// Removes every export, job and node an earlier Cairn run left behind (it was killed, or
    /// QEMU refused a teardown step), deleting the fleecing files of those nodes. Returns one line
    /// per thing removed. Bitmaps are reconciled by the caller (it knows which one to keep).
    public func removeLeftovers(timeout: Double = 30) throws -> [String] {
        var done: [String] = []
        if let exports = try? qmp.execute("query-block-exports") as? [[String: Any]] {
            for e in exports {
                guard let id = e["id"] as? String, id.hasPrefix(Self.exportPrefix) else { continue }
                try deleteExport(id, timeout: timeout)
                done.append("removed stale NBD export \(id)")
            }
        }
        if let jobs = try qmp.execute("query-block-jobs") as? [[String: Any]] {
            for j in jobs {
                guard let id = j["device"] as? String, id.hasPrefix(Self.jobPrefix) else { continue }
                try cancelJob(id, timeout: timeout)
                done.append("cancelled stale backup job \(id)")
            }
        }
        let nodes = try namedNodes()
        // The overlay files, from the protocol nodes (`cairn-fp-`) under the fleecing nodes.
        let files = nodes.compactMap { n -> String? in
            guard let name = n["node-name"] as? String, name.hasPrefix(Self.fileNodePrefix), let f = n["file"] as? String,
                  !f.hasPrefix("json:") else { return nil }
            return f
        }
        for n in nodes {
            guard let name = n["node-name"] as? String, name.hasPrefix(Self.nodePrefix) else { continue }
            try qmp.execute("blockdev-del", arguments: ["node-name": name])
            done.append("removed stale fleecing node \(name)")
        }
        for n in try namedNodes() {
            guard let name = n["node-name"] as? String, name.hasPrefix(Self.fileNodePrefix) else { continue }
            _ = try? qmp.execute("blockdev-del", arguments: ["node-name": name])
        }
        for file in files where (file as NSString).lastPathComponent.hasPrefix("cairn-fleece-") {
            if unlink(file) == 0 { done.append("deleted stale fleecing file \(file)") }
        }
        return done
    }

    func deleteExport(_ id: String, timeout: Double) throws {
        try qmp.execute("block-export-del", arguments: ["id": id, "mode": "hard"])
        _ = try qmp.nextEvent(names: ["BLOCK_EXPORT_DELETED"], timeout: timeout) { $0.string("id") == id }
    }

    func cancelJob(_ id: String, timeout: Double) throws {
        do {
            try qmp.execute("block-job-cancel", arguments: ["device": id, "force": true])
        } catch let e as CairnError where e.code == .notFound {
            return
        }
        guard try qmp.nextEvent(names: ["BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"], timeout: timeout, matching: { $0.string("device") == id }) != nil else {
            throw CairnError(.io, "QEMU did not end backup job \(id) within \(Int(timeout)) s", path: qmp.path)
        }
        // A job that is cancelled but not dismissed yet (auto-dismiss off) would keep its nodes busy.
        _ = try? qmp.execute("job-dismiss", arguments: ["id": id])
    }

    // MARK: - Configuration

    /// The VM as QEMU describes it (JSON text): its command line (from /proc of the process at
    /// the other end of the socket), machine type, CPUs, memory, QEMU version and disks.
    public func configuration(disks: [LiveDisk]) -> String {
        var config: [String: Any] = [:]
        if let pid = qmp.peerPID,
           let raw = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") {
            config["cmdline"] = raw.split(separator: 0, omittingEmptySubsequences: false).dropLast().map { String(decoding: $0, as: UTF8.self) }
        }
        if let v = qmp.qemuVersion { config["qemu"] = v }
        if let name = try? qmp.execute("query-name") as? [String: Any], let n = name["name"] as? String { config["name"] = n }
        if let type = try? qmp.execute("qom-get", arguments: ["path": "/machine", "property": "type"]) as? String { config["machine"] = type }
        if let cpus = try? qmp.execute("query-cpus-fast") as? [Any] { config["cpus"] = cpus.count }
        if let mem = try? qmp.execute("query-memory-size-summary") as? [String: Any], let base = mem["base-memory"] { config["memory"] = base }
        config["disks"] = disks.map { d -> [String: Any] in
            var o: [String: Any] = ["name": d.name, "node": d.node, "driver": d.driver, "size": d.virtualSize, "readOnly": d.readOnly]
            if let f = d.filename { o["file"] = f }
            return o
        }
        guard let data = try? JSONSerialization.data(withJSONObject: config, options: [.sortedKeys]) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}
