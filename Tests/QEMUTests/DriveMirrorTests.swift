import CairnCore
import CairnTestSupport
import Foundation
import Testing
@testable import QEMU
#if canImport(Glibc)
import Glibc
#endif

/// A qcow2 disk that a qemu-storage-daemon holds as node `src` and also exports writable over
/// NBD (name `src`), so qemu-io can write into it like a guest while it is being mirrored.
private struct ServedDisk {
    let dir: TempDir
    let source: String
    let nbd: String
    let daemon: QEMUProcess
    var uri: String { "nbd+unix:///src?socket=\(nbd)" }

    init(_ prefix: String, size: Int = 16 << 20) throws {
        dir = try TempDir(prefix)
        source = dir.file("source.qcow2")
        nbd = dir.file("nbd.sock")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", source, "\(size)"])
        // Data in most of the disk, a hole in the middle, data at the very end.
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 6M", "-c", "write -P 0x22 10M 5M",
                                 "-c", "write -P 0x33 \(size - 65536) 64k", source])
        daemon = try QEMUProcess.storageDaemon(dir, [
            "--blockdev", "driver=file,node-name=srcfile,filename=\(source)",
            "--blockdev", "driver=qcow2,node-name=src,file=srcfile",
            "--nbd-server", "addr.type=unix,addr.path=\(nbd)",
            "--export", "type=nbd,id=e,node-name=src,name=src,writable=on",
        ])
    }

    func write(_ pattern: UInt8, at offset: Int, length: Int) throws {
        try Tool.run("qemu-io", ["-f", "raw", "-c", "write -P \(pattern) \(offset) \(length)", uri])
    }

    func nodes(_ qmp: QMPClient) throws -> [String] {
        let list = try #require(try qmp.execute("query-named-block-nodes", arguments: ["flat": true]) as? [[String: Any]])
        return list.compactMap { $0["node-name"] as? String }
    }
}

@Suite("Drive mirror", .serialized)
struct DriveMirrorTests {
    @Test("a served qcow2 node mirrored to a qcow2 file while written to: the target equals the source, the node switched",
          .timeLimit(.minutes(3)))
    func mirrorWithWrites() throws {
        let disk = try ServedDisk("mirror-qcow2")
        defer { disk.daemon.stop() }
        let qmp = try disk.daemon.connect()
        defer { qmp.close() }
        let target = disk.dir.file("target.qcow2")
        var mirror = DriveMirror(client: qmp, disks: [MirrorDisk(node: "src", target: target, format: .qcow2)])
        mirror.speed = 4 << 20   // about 3 s for the 11 MiB of data: the writes below land during the copy
        mirror.progressInterval = 0.5
        let lines = Locked<[String]>([])
        mirror.progress = { line in lines.withLock { $0.append(line) } }
        // A guest-like writer during the bulk copy, and more writes once in sync.
        let writer = DispatchGroup()
        let writeErrors = Locked<[String]>([])
        DispatchQueue.global().async(group: writer) {
            for (i, offset) in [1 << 20, 7 << 20, 12 << 20].enumerated() {
                do { try disk.write(UInt8(0x40 + i), at: offset, length: 256 << 10) } catch { writeErrors.withLock { $0.append("\(error)") } }
            }
        }
        mirror.beforeSwitch = {
            writer.wait()
            try disk.write(0x5c, at: 8 << 20, length: 1 << 20)
        }
        let outcomes = try mirror.run()
        #expect(writeErrors.withLock { $0 }.isEmpty, "\(writeErrors.withLock { $0 })")
        #expect(outcomes.count == 1 && outcomes[0].sourceRemoved && outcomes[0].bytes == 16 << 20)
        #expect(lines.withLock { $0 }.contains { $0.contains("in sync") }, "\(lines.withLock { $0 })")
        let nodes = try disk.nodes(qmp)
        #expect(!nodes.contains("src") && nodes.contains("cairn-mirror0"), "the source node is gone, the target serves: \(nodes)")
        #expect((try qmp.execute("query-block-jobs") as? [Any])?.isEmpty == true)
        // The export followed the switch: a write now lands in the target only.
        try disk.write(0x77, at: 14 << 20, length: 64 << 10)
        try qmp.execute("quit")
        #expect(disk.daemon.waitForExit(timeout: 20))
        try Tool.run("qemu-img", ["check", "-q", target])
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "read -P 0x77 14M 64k", target])
        let old = try Tool.run("qemu-io", ["-f", "qcow2", "-c", "read -P 0x77 14M 64k", disk.source], check: false)
        #expect(old.stdout.contains("Pattern verification failed") || old.status != 0, "the source did not get the later write")
        // Everything before the switch is in both: make the one later write equal, then compare.
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x77 14M 64k", disk.source])
        #expect(try Tool.qemuImgCompare(disk.source, target, formatA: "qcow2", formatB: "qcow2"))
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "read -P 0x5c 8M 1M", "-c", "read -P 0x42 12M 256k", target])
    }

    @Test("raw targets: two nodes mirrored together, each target equals its source", .timeLimit(.minutes(3)))
    func rawTwoDisks() throws {
        let disk = try ServedDisk("mirror-raw")
        defer { disk.daemon.stop() }
        let qmp = try disk.daemon.connect()
        defer { qmp.close() }
        let second = disk.dir.file("second.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", second, "3M"])
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x99 1M 1M", second])
        try qmp.execute("blockdev-add", arguments: ["driver": "qcow2", "node-name": "two",
                                                    "file": ["driver": "file", "filename": second] as [String: Any]])
        let targets = [disk.dir.file("a.raw"), disk.dir.file("b.raw")]
        let outcomes = try DriveMirror(client: qmp, disks: [MirrorDisk(node: "src", target: targets[0], format: .raw),
                                                            MirrorDisk(node: "two", target: targets[1], format: .raw)]).run()
        #expect(outcomes.map(\.bytes) == [16 << 20, 3 << 20])
        try qmp.execute("quit")
        #expect(disk.daemon.waitForExit(timeout: 20))
        #expect(try Tool.qemuImgCompare(disk.source, targets[0], formatA: "qcow2", formatB: "raw"))
        #expect(try Tool.qemuImgCompare(second, targets[1], formatA: "qcow2", formatB: "raw"))
        #expect((try FileManager.default.attributesOfItem(atPath: targets[1])[.size] as? NSNumber)?.intValue == 3 << 20)
    }

    @Test("failures roll back: an unwritable target leaves no file; a mirror stopped mid-way is cancelled; the source stays attached",
          .timeLimit(.minutes(3)))
    func failuresRollBack() throws {
        let disk = try ServedDisk("mirror-fail")
        defer { disk.daemon.stop() }
        let qmp = try disk.daemon.connect()
        defer { qmp.close() }
        let good = disk.dir.file("good.qcow2")

        // The second target's directory cannot be written (root ignores modes: a path under a
        // regular file cannot be created by anyone).
        let blocker = disk.dir.file("not-a-directory")
        _ = FileManager.default.createFile(atPath: blocker, contents: Data("x".utf8))
        let bad = "\(blocker)/target.qcow2"
        try qmp.execute("blockdev-add", arguments: ["driver": "null-co", "node-name": "other", "size": 1 << 20])
        do {
            try DriveMirror(client: qmp, disks: [MirrorDisk(node: "src", target: good, format: .qcow2),
                                                 MirrorDisk(node: "other", target: bad, format: .qcow2)]).run()
            Issue.record("a target that cannot be created was accepted")
        } catch let e as CairnError {
            #expect(e.message.contains("keeps running from its source"), "\(e)")
            #expect(e.path == bad, "the error names the target: \(e)")
        }
        #expect(access(good, F_OK) != 0, "the target created before the failure is removed")
        #expect(access(bad, F_OK) != 0)

        // Stopped while copying (Ctrl-C, QEMU going away): jobs cancelled, nodes and files gone.
        var mirror = DriveMirror(client: qmp, disks: [MirrorDisk(node: "src", target: good, format: .qcow2)])
        mirror.speed = 1 << 20
        let started = Date()
        mirror.shouldStop = { Date().timeIntervalSince(started) > 1.5 }
        do {
            try mirror.run()
            Issue.record("a stopped mirror reported success")
        } catch let e as CairnError {
            #expect(e.code == .interrupted && e.message.contains("removed \(good)"), "\(e)")
        }
        #expect(access(good, F_OK) != 0, "the partial target is removed")
        let nodes = try disk.nodes(qmp)
        #expect(nodes.contains("src") && !nodes.contains { $0.hasPrefix("cairn-mirror") }, "\(nodes)")
        #expect((try qmp.execute("query-block-jobs") as? [Any])?.isEmpty == true)
        // The source still serves reads and writes.
        try disk.write(0x66, at: 0, length: 4096)
        try Tool.run("qemu-io", ["-f", "raw", "-c", "read -P 0x66 0 4k", "-c", "read -P 0x22 10M 64k", disk.uri])
        // An existing target is never overwritten.
        _ = FileManager.default.createFile(atPath: good, contents: Data("keep me".utf8))
        #expect(throws: CairnError.self) { try DriveMirror(client: qmp, disks: [MirrorDisk(node: "src", target: good, format: .raw)]).run() }
        #expect(FileManager.default.contents(atPath: good) == Data("keep me".utf8))
    }
}

