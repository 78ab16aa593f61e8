import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The small bootable VM of scripts/make-boot-vm.sh, built once per machine and reused.
enum BootVM {
    static let directory = "/tmp/cairn-test-bootvm"

    static func disk() throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let r = try Tool.run(root.appendingPathComponent("scripts/make-boot-vm.sh").path, [directory])
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

@Suite("Instant restore (CLI)", .serialized)
struct InstantRestoreTests {
    @Test("cairn serve: nbdinfo lists the exports, nbdcopy and qemu-img read a disk equal to the restore")
    func serveReadOnly() throws {
        let env = try CLIEnv("serve")
        try env.expect(0, ["init", "--encryption", "none", "--chunk-size", "64K"])
        let raw = env.file("disk.raw")
        try Disk.mixed(raw, size: 6 * MiB + 4096, seed: 404)
        try env.expect(0, ["backup", "--vm", "vm", "--no-skip-free", "sda=\(raw)"])
        let id = try #require(try env.snapshots().first?.string("id"))
        let short = String(id.prefix(8))
        let socket = env.file("nbd.sock")
        let server = try env.cli.start(["serve", "--repo", env.repo, id, "--socket", socket])
        defer { server.send(SIGINT); _ = server.wait(timeout: 30) }
        var waited = 0
        while access(socket, F_OK) != 0 && waited < 300 { usleep(50_000); waited += 1 }
        let list = try Tool.run("nbdinfo", ["--list", "nbd+unix:///?socket=\(socket)"])
        #expect(list.stdout.contains("\(short)-sda"), "\(list.stdout)")
        let copy = env.file("copy.raw")
        try Tool.run("nbdcopy", ["nbd+unix:///\(short)-sda?socket=\(socket)", copy])
        #expect(try Disk.cmpEqual(raw, copy))
        let converted = env.file("converted.qcow2")
        try Tool.run("qemu-img", ["convert", "-f", "raw", "nbd+unix:///\(short)-sda?socket=\(socket)", "-O", "qcow2", converted])
        try Tool.run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, converted])
        let write = try Tool.run("qemu-io", ["-f", "raw", "-c", "write -P 0xab 0 4k", "nbd+unix:///\(short)-sda?socket=\(socket)"], check: false)
        #expect(write.status != 0 || write.stderr.contains("ermission") || write.stdout.contains("ermission"), "a read-only export refuses writes: \(write)")
        server.send(SIGINT)
        let done = server.wait(timeout: 30)
        #expect(done.exitedNormally, "\(done)")
    }

    /// The bootable VM backed up, then booted from the backup by `cairn instant-restore`
    /// under TCG: its heartbeat appears on the serial console, its write lands in the overlay,
    /// the repository still checks clean and restores to the original bytes.
    @Test("instant-restore boots the backed-up VM to its heartbeat; writes go to the overlay; the backup is unchanged",
          .timeLimit(.minutes(10)))
    func bootsFromBackup() throws {
        let image = try BootVM.disk()
        let env = try CLIEnv("instant-restore")
        try env.expect(0, ["init", "--encryption", "none"])
        try env.expect(0, ["backup", "--vm", "tiny", "vda=\(image)"])
        let id = try #require(try env.snapshots().first?.string("id"))
        let overlays = env.file("overlays")
        let run = try env.cli.run(["instant-restore", id, "--accel", "tcg", "--memory", "256", "--no-network", "--overlay-dir", overlays],
                                  timeout: 300)
        #expect(run.exitedNormally && run.status == 0, "\(run)")
        let short = String(id.prefix(8))
        let serial = (try? String(contentsOfFile: "\(overlays)/\(short).serial.log", encoding: .utf8)) ?? ""
        #expect(serial.contains("CAIRN-HEARTBEAT"), "serial console: \(serial.suffix(2000))")
        #expect(serial.contains("CAIRN-WROTE-DISK"), "the guest wrote its disk: \(serial.suffix(500))")
        let overlay = try #require(FileManager.default.contents(atPath: "\(overlays)/\(short)-vda.overlay"))
        #expect(overlay.range(of: Data("CAIRN-GUEST-WROTE-THIS".utf8)) != nil, "the guest's write is in the overlay")
        #expect(access("\(overlays)/\(short).nbd.sock", F_OK) != 0, "the socket is removed")
        // The backup is untouched: it checks clean and restores to the original image.
        let check = try env.expect(0, ["check", "--read-data"])
        #expect(check.stdout.contains("no errors found"))
        let restored = env.file("restored.raw")
        try env.expect(0, ["restore", id, "--to", restored])
        try Tool.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", image, restored])
        let leftovers = try Tool.run("pgrep", ["-f", "qemu-system-x86_64.*\(short)"], check: false)
        #expect(leftovers.stdout.isEmpty, "no qemu left running: \(leftovers.stdout)")
    }
}
