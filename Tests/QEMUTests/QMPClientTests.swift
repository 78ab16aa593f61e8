import CairnCore
import CairnTestSupport
import Foundation
import Testing
@testable import QEMU
#if canImport(Glibc)
import Glibc
#endif

@Suite("QMP client")
struct QMPClientTests {
    @Test("greeting, capabilities and query-version against qemu-storage-daemon")
    func greetingAndVersion() throws {
        let dir = try TempDir("qmp-hello")
        let daemon = try QEMUProcess.storageDaemon(dir, [])
        defer { daemon.stop() }
        let qmp = try daemon.connect()
        defer { qmp.close() }
        let version = try #require(try qmp.execute("query-version") as? [String: Any])
        let q = try #require(version["qemu"] as? [String: Any])
        let fromCommand = "\(jsonInt(q["major"]) ?? -1).\(jsonInt(q["minor"]) ?? -1).\(jsonInt(q["micro"]) ?? -1)"
        #expect(qmp.qemuVersion == fromCommand, "the greeting's version is the one query-version reports")
        #expect((jsonInt(q["major"]) ?? 0) >= 7)
        // Capabilities were negotiated: commands work (before, only qmp_capabilities does).
        let commands = try #require(try qmp.execute("query-commands") as? [[String: Any]])
        #expect(commands.contains { $0["name"] as? String == "blockdev-mirror" })
    }

    @Test("error replies become CairnErrors naming the QMP class and description; the connection stays usable")
    func errorReplies() throws {
        let dir = try TempDir("qmp-errors")
        let daemon = try QEMUProcess.storageDaemon(dir, [])
        defer { daemon.stop() }
        let qmp = try daemon.connect()
        defer { qmp.close() }
        do {
            try qmp.execute("cairn-no-such-command")
            Issue.record("an unknown command succeeded")
        } catch let e as CairnError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("CommandNotFound") && e.message.contains("cairn-no-such-command"), "\(e)")
        }
        do {
            try qmp.execute("blockdev-del", arguments: ["node-name": "cairn-nothing-here"])
            Issue.record("deleting a missing node succeeded")
        } catch let e as CairnError {
            #expect(e.message.contains("GenericError") && e.message.contains("cairn-nothing-here"), "\(e)")
        }
        do {
            try qmp.execute("blockdev-add", arguments: ["driver": "null-co", "node-name": "n", "size": "not a number"])
            Issue.record("a badly typed argument was accepted")
        } catch let e as CairnError {
            #expect(e.message.contains("GenericError"), "\(e)")
        }
        #expect(try qmp.execute("query-version") is [String: Any], "later commands still get their own replies")
    }

    @Test("events arrive in order and are found by name and data, also when they came before the wait")
    func blockJobEvents() throws {
        let dir = try TempDir("qmp-events")
        let daemon = try QEMUProcess.storageDaemon(dir, [])
        defer { daemon.stop() }
        let qmp = try daemon.connect()
        defer { qmp.close() }
        for n in ["a", "b"] {
            try qmp.execute("blockdev-add", arguments: ["driver": "null-co", "node-name": n, "size": 4 << 20, "read-zeroes": true])
        }
        try qmp.execute("blockdev-mirror", arguments: ["job-id": "j", "device": "a", "target": "b", "sync": "full"])
        let ready = try qmp.waitForEvent(name: "BLOCK_JOB_READY", matching: { $0.string("device") == "j" }, timeout: 30)
        #expect(jsonInt(ready.data["len"]) == 4 << 20)
        #expect(ready.timestamp != nil)
        // The job's status changes were queued in the order QEMU sent them.
        var statuses: [String] = []
        while let e = try qmp.nextEvent(names: ["JOB_STATUS_CHANGE"], timeout: 0.2, matching: { $0.string("id") == "j" }) {
            statuses.append(e.string("status") ?? "?")
        }
        #expect(statuses == ["created", "running", "ready"], "\(statuses)")
        let jobs = try #require(try qmp.execute("query-block-jobs") as? [[String: Any]])
        #expect(jobs.first?["ready"] as? Bool == true)
        try qmp.execute("job-cancel", arguments: ["id": "j"])
        let end = try #require(try qmp.nextEvent(names: ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"], timeout: 30,
                                                 matching: { $0.string("device") == "j" }))
        #expect(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"].contains(end.name))
        // Taken events are gone; a wait for one that never comes times out.
        #expect(try qmp.nextEvent(names: ["BLOCK_JOB_READY"], timeout: 0.2) == nil)
    }

    @Test("qemu-system-x86_64 (TCG, no machine): STOP and RESUME events; quit closes the connection and later commands fail")
    func systemEmulatorEvents() throws {
        let dir = try TempDir("qmp-system")
        let vm = try QEMUProcess.emptyMachine(dir)
        defer { vm.stop() }
        let qmp = try vm.connect()
        defer { qmp.close() }
        let status = try #require(try qmp.execute("query-status") as? [String: Any])
        #expect(status["status"] as? String != nil)
        try qmp.execute("stop")
        try qmp.waitForEvent(name: "STOP", timeout: 20)
        try qmp.execute("cont")
        try qmp.waitForEvent(name: "RESUME", timeout: 20)
        let hmp = try qmp.execute("human-monitor-command", arguments: ["command-line": "info version"])
        #expect((hmp as? String)?.contains(qmp.qemuVersion ?? "?") == true, "\(hmp)")
        try qmp.execute("quit")
        #expect(vm.waitForExit(timeout: 20), "qemu quits")
        var failed = false
        let deadline = Date().addingTimeInterval(10)
        while !failed && Date() < deadline {
            do { try qmp.execute("query-status", timeout: 2) } catch { failed = true }
        }
        #expect(failed, "commands on a closed connection fail")
        #expect(!qmp.isConnected)
    }

    @Test("timeouts: no socket, a monitor busy with another client, a command never answered, an event never sent")
    func timeouts() throws {
        let dir = try TempDir("qmp-timeouts")
        var start = Date()
        #expect(throws: CairnError.self) { try QMPClient.connect(path: dir.file("absent.sock"), timeout: 0.5) }
        #expect(Date().timeIntervalSince(start) < 5)

        // A QMP socket serves one client at a time: the second one gets no greeting.
        let daemon = try QEMUProcess.storageDaemon(dir, [])
        defer { daemon.stop() }
        let first = try daemon.connect()
        defer { first.close() }
        start = Date()
        do {
            _ = try QMPClient.connect(path: daemon.qmp, timeout: 1)
            Issue.record("a second client got through")
        } catch let e as CairnError {
            #expect(e.message.contains("greeting"), "\(e)")
        }
        #expect(Date().timeIntervalSince(start) < 6)

        let silent = try SilentQMPServer(path: dir.file("silent.sock"))
        defer { silent.stop() }
        let qmp = try QMPClient.connect(path: silent.path, timeout: 5, commandTimeout: 0.5)
        defer { qmp.close() }
        start = Date()
        do {
            try qmp.execute("query-status")
            Issue.record("a command without a reply succeeded")
        } catch let e as CairnError {
            #expect(e.message.contains("no reply"), "\(e)")
        }
        #expect(Date().timeIntervalSince(start) < 5)
        start = Date()
        #expect(throws: CairnError.self) { try first.waitForEvent(name: "CAIRN_NEVER", timeout: 0.3) }
        #expect(Date().timeIntervalSince(start) < 5)
    }
}
