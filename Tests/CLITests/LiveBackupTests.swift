import CairnCore
import CairnTestSupport
import Foundation
import QEMU
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A qemu-storage-daemon holding one disk as node `disk0`, with an NBD server on `nbd.sock`
/// and a writable export `w` of the disk (the "guest": writes at known offsets go through it).
final class StorageDaemon: @unchecked Sendable {
    let daemon: BackgroundTool
    let qmpPath: String
    let nbdPath: String

    init(_ env: CLIEnv, disk: String, format: String, tag: String = "qsd") throws {
        qmpPath = env.file("\(tag)-qmp.sock")
        nbdPath = env.file("\(tag)-nbd.sock")
        daemon = try BackgroundTool("qemu-storage-daemon", [
            "--blockdev", "driver=file,filename=\(disk),node-name=file0",
            "--blockdev", "driver=\(format),file=file0,node-name=disk0",
            "--nbd-server", "addr.type=unix,addr.path=\(nbdPath)",
            "--export", "type=nbd,id=w,node-name=disk0,name=w,writable=on",
            "--chardev", "socket,path=\(qmpPath),server=on,wait=off,id=m", "--monitor", "chardev=m",
        ], in: env.dir, stderrName: "\(tag).err")
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: nbdPath) && Date() < deadline { usleep(20_000) }
    }

    var writeURI: String { "nbd+unix:///w?socket=\(nbdPath)" }

    /// Writes through the writable export, like a guest would (qemu-io commands).
    func write(_ commands: [String]) throws {
        try Tool.run("qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [writeURI])
    }

    func qmp() throws -> QMPClient { try QMPClient.connect(path: qmpPath, timeout: 20) }

    /// Stops cleanly (persistent bitmaps are saved on a clean exit only).
    func quit() {
        if let q = try? qmp() { _ = try? q.execute("quit"); q.close() }
        daemon.waitForExit(timeout: 10)
        stop()
    }

    func stop() { daemon.stop() }
}

/// `cairn backup --qmp` against qemu-storage-daemon: fleecing, dirty-bitmap CBT, fallbacks,
/// cleanup after a killed run (docs/LIVE-BACKUP.md).
@Suite(.serialized) struct LiveBackupTests {
    static let chunk = 512 * 1024

    func backup(_ env: CLIEnv, _ qsd: StorageDaemon, _ extra: [String] = [], status: Int32 = 0,
                sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Any] {
        let r = try env.expect(status, ["backup", "--vm", "qsd", "--qmp", qsd.qmpPath, "--node", "disk0", "--nbd-socket", qsd.nbdPath,
                                        "--scratch-dir", env.dir.path, "--no-skip-free", "--no-catalog", "--json"] + extra,
                               sourceLocation: sourceLocation)
        let line = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        let obj = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
        return try #require(obj, "summary line: \(r.stdout) \(r.stderr)", sourceLocation: sourceLocation)
    }

    func disk0(_ summary: [String: Any]) -> [String: Any] {
        ((summary["disks"] as? [[String: Any]]) ?? []).first ?? [:]
    }

    /// The QEMU state a finished backup must leave: no fleecing node, only the test's export,
    /// exactly one Cairn bitmap on the disk.
    func expectClean(_ qsd: StorageDaemon, bitmap: String?, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let q = try qsd.qmp()
        defer { q.close() }
        let nodes = try #require(try q.execute("query-named-block-nodes", arguments: ["flat": true]) as? [[String: Any]])
        let names = nodes.compactMap { $0["node-name"] as? String }
        #expect(!names.contains { $0.hasPrefix("cairn-") }, "fleecing nodes left: \(names)", sourceLocation: sourceLocation)
        let exports = try #require(try q.execute("query-block-exports") as? [[String: Any]]).compactMap { $0["id"] as? String }
        #expect(exports == ["w"], "exports left: \(exports)", sourceLocation: sourceLocation)
        let disk = nodes.first { $0["node-name"] as? String == "disk0" } ?? [:]
        let bitmaps = (disk["dirty-bitmaps"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        if let bitmap { #expect(bitmaps == [bitmap], "bitmaps: \(bitmaps)", sourceLocation: sourceLocation) }
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: (qsd.qmpPath as NSString).deletingLastPathComponent)
            .filter { $0.hasPrefix("cairn-fleece-") || $0.hasPrefix("cairn-nbd-") }
        #expect(leftovers.isEmpty, "scratch files left: \(leftovers)", sourceLocation: sourceLocation)
    }

    /// Byte-equal restore of `snapshot` against what the export shows now (or a saved copy).
    func expectRestoreEquals(_ env: CLIEnv, _ snapshot: String, _ reference: String, formatB: String = "raw",
                             sourceLocation: SourceLocation = #_sourceLocation) throws {
        let out = env.file("restored-\(UUID().uuidString.prefix(6)).raw")
        try env.expect(0, ["restore", snapshot, "--to", out], sourceLocation: sourceLocation)
        #expect(try Tool.qemuImgCompare(out, reference, formatA: "raw", formatB: formatB), "restore of \(snapshot) differs from \(reference)",
                sourceLocation: sourceLocation)
        try? FileManager.default.removeItem(atPath: out)
    }

    @Test func incrementalReadsOnlyDirtyExtents() throws {
        let env = try CLIEnv("live-cbt")
        let disk = env.file("disk.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", disk, "64M"])
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 20M 5M", "-c", "write -P 0x33 63M 1M", disk])
        try env.expect(0, ["init"])
        let qsd = try StorageDaemon(env, disk: disk, format: "qcow2")

        let full = try backup(env, qsd)
        #expect(disk0(full)["read_mode"] as? String == "full")
        let fullID = try #require(full["id"] as? String)
        // Only allocated data is read: 9 MiB of 64.
        #expect((disk0(full)["nbd_bytes_requested"] as? Int ?? 0) <= 9 * MiB + Self.chunk)
        let bitmap1 = try #require(disk0(full)["bitmap"] as? String)
        try expectClean(qsd, bitmap: bitmap1)
        let copy1 = env.file("copy1.raw")
        try Tool.run("qemu-img", ["convert", "-f", "raw", "-O", "raw", qsd.writeURI, copy1])

        // Known writes at known offsets, then an incremental.
        let writes: [(offset: Int, length: Int)] = [(1 * MiB, 64 * KiB), (10 * MiB + 4 * KiB, 4 * KiB), (40 * MiB, 1 * MiB), (63 * MiB + 512 * KiB, 8 * KiB)]
        try qsd.write(writes.enumerated().map { "write -P \(0x40 + $0.offset) \($0.element.offset) \($0.element.length)" })
        let inc = try backup(env, qsd, ["--cbt-sample", "0"])
        let d = disk0(inc)
        #expect(d["read_mode"] as? String == "cbt", "\(d)")
        var chunks = Set<Int>()
        for w in writes { for c in (w.offset / Self.chunk)...((w.offset + w.length - 1) / Self.chunk) { chunks.insert(c) } }
        let requested = d["nbd_bytes_requested"] as? Int ?? -1
        #expect(requested > 0 && requested <= chunks.count * Self.chunk, "read \(requested) bytes over NBD for \(chunks.count) dirty chunks: \(d)")
        let dirty = d["dirty_bytes"] as? Int ?? 0
        #expect(dirty >= writes.reduce(0) { $0 + $1.length } && dirty <= chunks.count * Self.chunk)
        let bitmap2 = try #require(d["bitmap"] as? String)
        #expect(bitmap2 != bitmap1)
        try expectClean(qsd, bitmap: bitmap2)

        // Both snapshots are full restore points.
        try expectRestoreEquals(env, try #require(inc["id"] as? String), qsd.writeURI)
        try expectRestoreEquals(env, fullID, copy1)

        // The default 1 % sample reads at least one unchanged chunk and finds it equal.
        try qsd.write(["write -P 0x77 30M 4k"])
        let sampled = disk0(try backup(env, qsd))
        #expect(sampled["read_mode"] as? String == "cbt")
        let note = sampled["note"] as? String ?? ""
        #expect(note.contains("all equal"), "\(sampled)")
        // Exactly the asked share is read: ceil(1 % of the unchanged chunks), at least one.
        let counts = note.components(separatedBy: "CBT check: ").last?.components(separatedBy: " ") ?? []
        if counts.count > 2, let n = Int(counts[0]), let m = Int(counts[2]) {
            #expect(n == max(1, (m + 99) / 100), "\(note)")
        } else {
            Issue.record("no CBT check counts in \(note)")
        }
        let snaps = try env.snapshots()
        #expect(snaps.count == 3)
        let human = try env.expect(0, ["snapshots"]).stdout
        #expect(human.contains("cbt") && human.contains("full") && human.contains("crash"), "\(human)")
    }

    @Test func untrustworthyBitmapsFallBackToHashScan() throws {
        let env = try CLIEnv("live-fallback")
        let disk = env.file("disk.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", disk, "32M"])
        try Tool.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 16M 8M", disk])
        try env.expect(0, ["init", "--encryption", "none"])
        var qsd = try StorageDaemon(env, disk: disk, format: "qcow2")
        let first = disk0(try backup(env, qsd))
        let bitmap = try #require(first["bitmap"] as? String)

        // 1. Someone deletes the bitmap.
        do {
            let q = try qsd.qmp()
            try q.execute("block-dirty-bitmap-remove", arguments: ["node": "disk0", "name": bitmap])
            q.close()
        }
        try qsd.write(["write -P 0x55 2M 64k"])
        let afterDelete = disk0(try backup(env, qsd))
        #expect(afterDelete["read_mode"] as? String == "hash-scan", "\(afterDelete)")
        #expect((afterDelete["note"] as? String ?? "").contains("is gone"), "\(afterDelete)")
        #expect((afterDelete["nbd_bytes_requested"] as? Int ?? 0) >= 16 * MiB)
        try expectRestoreEquals(env, "latest", qsd.writeURI)

        // 2. The bitmap lies: writes made while it was disabled. The 100 % sample catches it.
        let liar = try #require(afterDelete["bitmap"] as? String)
        do {
            let q = try qsd.qmp()
            try q.execute("block-dirty-bitmap-disable", arguments: ["node": "disk0", "name": liar])
            q.close()
            try qsd.write(["write -P 0x66 17M 4k"])
            let q2 = try qsd.qmp()
            try q2.execute("block-dirty-bitmap-enable", arguments: ["node": "disk0", "name": liar])
            q2.close()
        }
        let lied = try backup(env, qsd, ["--cbt-sample", "100%"])
        let ld = disk0(lied)
        #expect(ld["read_mode"] as? String == "hash-scan", "\(ld)")
        #expect((ld["note"] as? String ?? "").contains("missed a write"), "\(ld)")
        try expectRestoreEquals(env, try #require(lied["id"] as? String), qsd.writeURI)

        // 2b. The newest snapshot fails verification (every stored chunk damaged): it is not the
        // base of the next backup, which reads everything, stores the chunks again and verifies.
        for rel in env.repoFiles("chunks") {
            let path = env.file("repo/chunks/\(rel)")
            var bytes = try readFile(path)
            bytes[bytes.count - 1] ^= 0xFF
            try FileManager.default.removeItem(atPath: path)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
        }
        try env.expect(3, ["verify", "latest", "--vm", "qsd"])
        let healing = disk0(try backup(env, qsd))
        #expect(healing["read_mode"] as? String == "hash-scan", "\(healing)")
        #expect((healing["note"] as? String ?? "").contains("failed verification"), "\(healing)")
        try env.expect(0, ["verify", "latest", "--vm", "qsd"])
        try expectRestoreEquals(env, "latest", qsd.writeURI)

        // 3. A persistent bitmap survives a clean restart: CBT goes on.
        qsd.quit()
        qsd = try StorageDaemon(env, disk: disk, format: "qcow2", tag: "qsd2")
        try qsd.write(["write -P 0x67 5M 4k"])
        let restarted = disk0(try backup(env, qsd))
        #expect(restarted["read_mode"] as? String == "cbt", "\(restarted)")
        try expectRestoreEquals(env, "latest", qsd.writeURI)
        qsd.quit()

        // 4. A raw disk's bitmap is not persistent: after a restart it is gone -> hash scan.
        let raw = env.file("disk.raw")
        try Tool.run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", disk, raw])
        let env2 = env
        var rq = try StorageDaemon(env2, disk: raw, format: "raw", tag: "raw1")
        let r1 = try env2.expect(0, ["backup", "--vm", "rawvm", "--qmp", rq.qmpPath, "--node", "disk0", "--nbd-socket", rq.nbdPath,
                                     "--scratch-dir", env.dir.path, "--no-skip-free", "--no-catalog"])
        #expect(r1.stderr.contains("not qcow2"), "\(r1.stderr)")
        rq.quit()
        rq = try StorageDaemon(env2, disk: raw, format: "raw", tag: "raw2")
        try rq.write(["write -P 0x68 3M 4k"])
        let r2 = try env2.expect(0, ["backup", "--vm", "rawvm", "--qmp", rq.qmpPath, "--node", "disk0", "--nbd-socket", rq.nbdPath,
                                     "--scratch-dir", env.dir.path, "--no-skip-free", "--no-catalog", "--json"])
        #expect(r2.stdout.contains("\"read_mode\":\"hash-scan\"") && r2.stdout.contains("is gone"), "\(r2.stdout)")
        try expectRestoreEquals(env, "latest", rq.writeURI)
        rq.quit()
    }

    @Test func killedBackupIsCleanedUpByTheNext() throws {
        let env = try CLIEnv("live-kill")
        let disk = env.file("disk.qcow2")
        // Incompressible data so the backup takes a moment.
        let noise = env.file("noise.raw")
        try Tool.run("dd", ["if=/dev/urandom", "of=\(noise)", "bs=1M", "count=320", "status=none"])
        try Tool.run("truncate", ["-s", "384M", noise])
        try Tool.run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", noise, disk])
        try? FileManager.default.removeItem(atPath: noise)
        try env.expect(0, ["init"])
        let qsd = try StorageDaemon(env, disk: disk, format: "qcow2")
        let first = disk0(try backup(env, qsd, ["--workers", "1"]))
        #expect(first["read_mode"] as? String == "full")

        // A failing pre-hook stops the backup before QEMU is touched.
        let hooked = try env.cli.run(["backup", "--vm", "qsd", "--qmp", qsd.qmpPath, "--node", "disk0", "--nbd-socket", qsd.nbdPath,
                                      "--scratch-dir", env.dir.path, "--pre-hook", "exit 3"])
        #expect(hooked.status != 0 && hooked.stderr.contains("pre hook"), "\(hooked)")
        try expectClean(qsd, bitmap: first["bitmap"] as? String)

        try qsd.write(["write -P 0x21 0 200M"])
        // SIGTERM in the middle: exit status 130, and QEMU is left clean with the bitmap rolled
        // back (the next run is still an incremental).
        let term = try env.cli.start(["backup", "--vm", "qsd", "--qmp", qsd.qmpPath, "--node", "disk0", "--nbd-socket", qsd.nbdPath,
                                      "--scratch-dir", env.dir.path, "--no-skip-free", "--no-catalog", "--workers", "1"])
        while !term.stderrSoFar.contains("point in time taken") && term.isRunning { usleep(5_000) }
        term.send(SIGTERM)
        let termed = term.wait()
        #expect(termed.status == 130, "\(termed)")
        try expectClean(qsd, bitmap: first["bitmap"] as? String)
        #expect(try env.snapshots().count == 1)

        let run = try env.cli.start(["backup", "--vm", "qsd", "--qmp", qsd.qmpPath, "--node", "disk0", "--nbd-socket", qsd.nbdPath,
                                     "--scratch-dir", env.dir.path, "--no-skip-free", "--no-catalog", "--workers", "1"])
        let deadline = Date().addingTimeInterval(60)
        while !run.stderrSoFar.contains("point in time taken") && run.isRunning && Date() < deadline { usleep(5_000) }
        #expect(run.isRunning, "the backup finished before it could be killed: \(run.stderrSoFar)")
        run.send(SIGKILL)
        _ = run.wait()

        // The storage daemon still runs, with the dead run's node and export in it.
        #expect(qsd.daemon.isRunning)
        let q = try qsd.qmp()
        let nodes = try #require(try q.execute("query-named-block-nodes", arguments: ["flat": true]) as? [[String: Any]]).compactMap { $0["node-name"] as? String }
        q.close()
        #expect(nodes.contains { $0.hasPrefix("cairn-f-") }, "nodes: \(nodes)")

        let r = try env.expect(0, ["backup", "--vm", "qsd", "--qmp", qsd.qmpPath, "--node", "disk0", "--nbd-socket", qsd.nbdPath,
                                   "--scratch-dir", env.dir.path, "--no-skip-free", "--no-catalog", "--json"])
        #expect(r.stderr.contains("removed stale fleecing node"), "\(r.stderr)")
        #expect(r.stderr.contains("re-enabled"), "\(r.stderr)")
        #expect(r.stdout.contains("\"read_mode\":\"cbt\""), "\(r.stdout)")
        let summary = try #require(try JSONSerialization.jsonObject(with: Data((r.stdout.split(separator: "\n").last ?? "").utf8)) as? [String: Any])
        try expectClean(qsd, bitmap: disk0(summary)["bitmap"] as? String)
        try expectRestoreEquals(env, "latest", qsd.writeURI)
    }
}
