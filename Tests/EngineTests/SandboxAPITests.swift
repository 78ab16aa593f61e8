import CairnCore
import CairnTestSupport
@testable import Engine
import Foundation
import Repository
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The Sandbox API as `cairn verify --level boot` calls it (the CLI tests cover `cairn sandbox`).
@Suite("Sandbox API (real QEMU under TCG)", .serialized)
struct SandboxAPITests {
    /// scripts/make-boot-vm.sh's VM (boot.raw powers off after its heartbeat, boot-stay.raw stays up).
    static func testVM(_ name: String) throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let boot = try Tool.run(root.appendingPathComponent("scripts/make-boot-vm.sh").path, ["/tmp/cairn-test-sandboxvm"])
        let path = (boot.stdout.trimmingCharacters(in: .whitespacesAndNewlines) as NSString).deletingLastPathComponent
        return (path as NSString).appendingPathComponent(name)
    }

    @Test("verify in an encrypted repository: passed, serial log and PNG in the outcome; an existing work directory is kept, its sandbox subdirectory removed",
          .timeLimit(.minutes(3)))
    func verifyOutcome() throws {
        let dir = try TempDir("sandbox-api")
        let repo = try E.makeRepo(dir, encryption: .aes256gcm)
        let snap = try E.backup(repo, vm: "tiny", [E.DiskSpec("vda", try Self.testVM("boot.raw"))])
        let work = dir.file("work")
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: false)
        var options = SandboxOptions(workDir: work)
        options.accel = "tcg"
        options.memoryMiB = 256
        options.heartbeat = .serial("CAIRN-HEARTBEAT")
        options.timeout = 60
        let lines = Mutex<[String]>([])
        options.log = { line in lines.withLock { $0.append(line) } }
        let outcome = try Sandbox(repository: repo, snapshot: snap, options: options).verify(cancel: CancellationToken())
        #expect(outcome.passed, "\(outcome.reason)")
        #expect(outcome.accel == "tcg" && outcome.hostPort == nil)
        #expect(outcome.seconds > 0 && outcome.seconds < 60)
        #expect(String(decoding: outcome.serialLog, as: UTF8.self).contains("CAIRN-HEARTBEAT"))
        let png = try #require(outcome.screenshotPNG)
        #expect(png.starts(with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) && png.count > 100)
        #expect(lines.withLock { $0 }.contains { $0.contains("with tcg") })
        #expect(FileManager.default.fileExists(atPath: work), "the caller's directory stays")
        #expect((try FileManager.default.contentsOfDirectory(atPath: work)).isEmpty, "the sandbox's subdirectory is gone")
    }

    @Test("runKept: ready is called once after the heartbeat; cancelling stops and removes the VM", .timeLimit(.minutes(3)))
    func runKeptCancels() throws {
        let dir = try TempDir("sandbox-kept")
        let repo = try E.makeRepo(dir)
        let snap = try E.backup(repo, vm: "stay", [E.DiskSpec("vda", try Self.testVM("boot-stay.raw"))])
        let work = dir.file("kept-\(UUID().uuidString.prefix(8))")
        var options = SandboxOptions(workDir: work)
        options.accel = "tcg"
        options.memoryMiB = 256
        options.heartbeat = .serial("CAIRN-STAYING")
        options.timeout = 60
        let cancel = CancellationToken()
        var readyCalls = 0
        var qemuWhileReady = ""
        let outcome = try Sandbox(repository: repo, snapshot: snap, options: options).runKept(cancel: cancel) { ready in
            readyCalls += 1
            #expect(ready.passed)
            qemuWhileReady = (try? Tool.run("pgrep", ["-f", "qemu-system-x86_64.*\(work)"], check: false).stdout) ?? ""
            // Ticks keep coming while it is kept; stop after a moment.
            DispatchQueue.global().asyncAfter(deadline: .now() + 2) { cancel.cancel() }
        }
        #expect(readyCalls == 1)
        #expect(!qemuWhileReady.isEmpty, "QEMU ran while kept")
        #expect(outcome.passed && outcome.reason.contains("stopped by an interrupt"), "\(outcome.reason)")
        #expect(String(decoding: outcome.serialLog, as: UTF8.self).contains("CAIRN-TICK 2"), "the guest kept running")
        #expect(try Tool.run("pgrep", ["-f", "qemu-system-x86_64.*\(work)"], check: false).stdout.isEmpty)
        #expect(access(work, F_OK) != 0)
    }

    @Test("options that cannot work are usage errors before anything starts")
    func badOptions() throws {
        let dir = try TempDir("sandbox-opts")
        let repo = try E.makeRepo(dir)
        let snap = try E.backup(repo, source: MemoryBlockSource([UInt8](repeating: 1, count: 65536)), guest: false)
        func expectUsage(_ change: (inout SandboxOptions) -> Void) {
            var o = SandboxOptions(workDir: dir.file("w"))
            change(&o)
            #expect {
                _ = try Sandbox(repository: repo, snapshot: snap, options: o).verify(cancel: CancellationToken())
            } throws: { ($0 as? CairnError)?.code == .usage }
            #expect(access(dir.file("w"), F_OK) != 0)
        }
        expectUsage { $0.forwardPort = 22 }
        expectUsage { $0.heartbeat = .tcp(port: 80) }
        expectUsage { $0.accel = "hvf" }
        expectUsage { $0.network = .user; $0.forwardPort = 70000 }
        expectUsage { $0.heartbeat = .serial("") }
    }

    @Test("the TCP heartbeat reads QEMU's info usernet: only an ESTABLISHED row to the guest port counts")
    func usernetTable() {
        let table = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
            + "  TCP[ESTABLISHED]   21       127.0.0.1 40123       10.0.2.15    22     0     0\r\n"
            + "  TCP[SYN_SENT]      22       127.0.0.1 40124       10.0.2.15    80     0     0\r\n"
            + "  TCP[HOST_FORWARD]  11       127.0.0.1 40124       10.0.2.15    80     0     0\r\n"
        #expect(TCPServiceProbe.establishedToGuest(port: 22, usernet: table))
        #expect(!TCPServiceProbe.establishedToGuest(port: 80, usernet: table))
        #expect(!TCPServiceProbe.establishedToGuest(port: 2, usernet: table))
    }
}
