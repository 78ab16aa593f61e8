import CairnCore
import CairnTestSupport
import Foundation
import QEMU
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Live migration of an instant-restored VM (issue 4 item 5): the staying variant of the test
/// VM is backed up, booted from the backup by `cairn instant-restore --migrate-to`, moved to a
/// local qcow2 file while it runs, and keeps running (and writing) from that file after the
/// NBD export is closed.
@Suite("Live migration (CLI)", .serialized)
struct MigrationTests {
    @Test("instant-restore --migrate-to: the running VM moves to a local qcow2 with its writes, the export closes, the VM keeps running",
          .timeLimit(.minutes(10)))
    func migratesRunningVM() throws {
        let image = ((try BootVM.disk()) as NSString).deletingLastPathComponent + "/boot-stay.raw"
        #expect(FileManager.default.fileExists(atPath: image), "scripts/make-boot-vm.sh makes boot-stay.raw")
        let env = try CLIEnv("migration")
        try env.expect(0, ["init", "--encryption", "none"])
        try env.expect(0, ["backup", "--vm", "tiny", "vda=\(image)"])
        let id = try #require(try env.snapshots().first?.string("id"))
        let short = String(id.prefix(8))
        let overlays = env.file("overlays")
        let targetDir = env.file("local")
        try FileManager.default.createDirectory(atPath: targetDir, withIntermediateDirectories: true)
        let target = "\(targetDir)/tiny-vda.qcow2"
        let serialPath = "\(overlays)/\(short).serial.log"
        let run = try env.cli.start(["instant-restore", id, "--accel", "tcg", "--memory", "256", "--no-network",
                                     "--overlay-dir", overlays, "--migrate-to", targetDir])
        var finished: CLIResult?
        defer {
            if finished == nil {
                // Stop the VM through its monitor, then cairn (which also stops qemu on SIGINT).
                if let q = try? QMPClient.connect(path: "\(overlays)/\(short).qmp.sock", timeout: 5) {
                    _ = try? q.execute("quit")
                    q.close()
                }
                run.send(SIGINT)
                _ = run.wait(timeout: 60)
            }
        }
        func serial() -> String { (try? String(contentsOfFile: serialPath, encoding: .utf8)) ?? "" }
        func output() -> String { run.stderrSoFar }
        func lastTick(_ s: String) -> Int {
            // The console ends lines with CRLF (one Character in Swift): split on newlines proper.
            s.components(separatedBy: .newlines).compactMap { line in
                let l = line.trimmingCharacters(in: .whitespacesAndNewlines)
                return l.hasPrefix("CAIRN-TICK ") ? Int(l.dropFirst("CAIRN-TICK ".count)) : nil
            }.max() ?? 0
        }

        // The guest is up and staying, and cairn says the migration is done and the export closed.
        var deadline = Date().addingTimeInterval(300)
        while Date() < deadline && run.isRunning {
            let out = output()
            if serial().contains("CAIRN-STAYING") && out.contains("migration done") && out.contains("NBD export is closed") { break }
            usleep(200_000)
        }
        guard run.isRunning else {
            finished = run.wait(timeout: 10)
            Issue.record("cairn stopped before the migration was done: \(finished!)\nserial: \(serial().suffix(1000))")
            return
        }
        let out = output()
        try #require(out.contains("migration done") && out.contains("NBD export is closed"), "cairn's output: \(out)\nserial: \(serial().suffix(1000))")
        #expect(out.contains("in sync"), "progress lines: \(out)")
        #expect(access("\(overlays)/\(short).nbd.sock", F_OK) != 0, "the NBD socket is gone once the export is closed")

        // Ticks written after the export closed: tick N+2 was started after this point.
        let tickAtDone = lastTick(serial())
        deadline = Date().addingTimeInterval(120)
        while lastTick(serial()) < tickAtDone + 2 && Date() < deadline { usleep(200_000) }
        let tickSeen = lastTick(serial())
        #expect(tickSeen >= tickAtDone + 2, "the guest keeps running from local storage: \(serial().suffix(500))")

        // QEMU: running, its disk on the target file, not on NBD.
        let qmp = try QMPClient.connect(path: "\(overlays)/\(short).qmp.sock")
        let status = try qmp.execute("query-status")
        #expect((status as? [String: Any])?["status"] as? String == "running", "\(status)")
        let block = try qmp.execute("query-block")
        let devices = try #require(block as? [[String: Any]], "\(block)")
        let inserted = devices.compactMap { $0["inserted"] as? [String: Any] }
        #expect(inserted.count == 1, "\(devices)")
        #expect(inserted.first?["file"] as? String == target, "the disk is the target file: \(inserted)")
        #expect(inserted.first?["drv"] as? String == "qcow2", "\(inserted)")
        let nodes = try qmp.execute("query-named-block-nodes", arguments: ["flat": true])
        let drivers = (nodes as? [[String: Any]] ?? []).compactMap { $0["drv"] as? String }
        #expect(!drivers.isEmpty && !drivers.contains("nbd"), "no NBD node is left: \(drivers)")
        _ = try? qmp.execute("quit")
        qmp.close()
        let result = run.wait(timeout: 120)
        finished = result
        #expect(result.exitedNormally && result.status == 0, "\(result)")

        // The target: a clean qcow2 with the guest's boot-time marker and its last tick.
        try Tool.run("qemu-img", ["check", "-q", "-f", "qcow2", target])
        let flat = env.file("target.raw")
        try Tool.run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", target, flat])
        let bytes = try #require(FileManager.default.contents(atPath: flat))
        #expect(bytes.count == 64 * MiB)
        let lastMiB = bytes.suffix(MiB)
        #expect(lastMiB.range(of: Data("CAIRN-GUEST-WROTE-THIS".utf8)) != nil, "the guest's marker is in the migrated disk")
        let tickRange = lastMiB.startIndex + 4096 ..< lastMiB.startIndex + 4096 + 19
        let tickText = String(decoding: bytes[tickRange], as: UTF8.self)
        #expect(tickText.hasPrefix("CAIRN-TICK-"), "the tick area: \(tickText)")
        let tickOnDisk = Int(tickText.dropFirst("CAIRN-TICK-".count)) ?? 0
        #expect(tickOnDisk >= tickSeen, "the last tick the guest printed (\(tickSeen)) is in the migrated disk (\(tickOnDisk))")
        #expect(tickOnDisk >= tickAtDone + 2, "writes made after the switch went to the local disk")
        // Nothing left behind.
        let leftovers = try Tool.run("pgrep", ["-f", "qemu-system-x86_64.*\(overlays)"], check: false)
        #expect(leftovers.stdout.isEmpty, "no qemu left running: \(leftovers.stdout)")
        #expect(access("\(overlays)/\(short).nbd.sock", F_OK) != 0)
    }

    @Test("--migrate-to refuses before booting: an existing target file, a file path for several disks, an unknown format")
    func refusesBadTargets() throws {
        let env = try CLIEnv("migration-args")
        try env.expect(0, ["init", "--encryption", "none"])
        let a = env.file("a.raw"), b = env.file("b.raw")
        try Disk.mixed(a, size: 1 * MiB, seed: 1)
        try Disk.mixed(b, size: 1 * MiB, seed: 2)
        try env.expect(0, ["backup", "--vm", "two", "vda=\(a)", "vdb=\(b)"])
        let id = try #require(try env.snapshots().first?.string("id"))
        let overlays = env.file("overlays")
        let common = ["instant-restore", id, "--accel", "tcg", "--no-network", "--overlay-dir", overlays, "--qemu", "/nonexistent/qemu"]
        let existing = env.file("existing.qcow2")
        _ = FileManager.default.createFile(atPath: existing, contents: Data("keep".utf8))
        let dir = env.file("local")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: "\(dir)/two-vdb.qcow2", contents: Data("keep".utf8))
        for (args, says) in [(["--migrate-to", env.file("one-file.qcow2")], "2 disks"),
                             (["--migrate-to", dir], "exists"),
                             (["--migrate-to", dir, "--migrate-format", "vmdk"], "qcow2 or raw")] {
            let r = try env.cli.run(common + args, timeout: 60)
            #expect(r.exitedNormally && r.status != 0 && r.stderr.contains(says), "\(args): \(r)")
            #expect(!r.stderr.contains("booting"), "nothing is started: \(r)")
        }
        #expect(FileManager.default.contents(atPath: "\(dir)/two-vdb.qcow2") == Data("keep".utf8))
        #expect(access("\(dir)/two-vda.qcow2", F_OK) != 0, "no target is created when any is refused")
        #expect(FileManager.default.contents(atPath: existing) == Data("keep".utf8))
    }
}
