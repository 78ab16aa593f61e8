import CairnCore
import CairnTestSupport
import Foundation
import Testing
@testable import QEMU
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Against qemu-ga in a VM

/// Alone each test takes about 5 s once the boot images exist. On a clean machine the first
/// test also waits for scripts/make-boot-vm.sh (its lazy fixture), which the other VM suites
/// build at the same moment under one flock: 250-265 s in CI. The time limits only catch a
/// real hang.
@Suite("Guest agent: qemu-ga in a TCG VM", .serialized)
struct GuestAgentVMTests {
    @Test("ping, status, freeze of the guest's ext4, status frozen, a second freeze refused, thaw, status thawed",
          .timeLimit(.minutes(10)))
    func freezeAndThaw() throws {
        let vm = try AgentVM("freeze")
        defer { vm.stop() }
        let boot = try vm.waitForSerial("CAIRN-AGENT-UP")
        #expect(vm.serial.contains("CAIRN-DATA-MOUNTED"), "the ext4 on /dev/vda2 is mounted: \(vm.serial)")
        print("agent VM: CAIRN-AGENT-UP \(String(format: "%.1f", boot)) s after QEMU started")
        let agent = try GuestAgentClient.connect(path: vm.agentSocket)
        defer { agent.close() }
        try agent.ping()
        #expect(try agent.fsfreezeStatus() == "thawed")
        let frozen = try agent.freeze()
        #expect(frozen == 1, "one freezable file system: the ext4 on /mnt/data")
        #expect(try agent.fsfreezeStatus() == "frozen")
        try agent.ping()
        // The guest keeps ticking while frozen: its log writes go to the raw disk, not the ext4.
        try vm.waitForSerial("CAIRN-TICK \(vm.lastTick + 1)", timeout: 10)
        do {
            try agent.freeze()
            Issue.record("a second freeze succeeded")
        } catch let e as CairnError {
            #expect(e.message.contains("guest-fsfreeze-freeze"), "\(e)")
            #expect(e.path == vm.agentSocket)
        }
        #expect(try agent.fsfreezeStatus() == "frozen")
        #expect(try agent.thaw() == frozen)
        #expect(try agent.fsfreezeStatus() == "thawed")
        #expect(try agent.thaw() == 0, "thawing a thawed guest thaws nothing")

        // A reply given up on (timeout 0) is dropped by the next command's resync.
        _ = try? agent.execute("guest-fsfreeze-status", timeout: 0)
        #expect(try agent.fsfreezeStatus() == "thawed")
        // A new connection resyncs past whatever the last one left behind.
        agent.close()
        let again = try GuestAgentClient.connect(path: vm.agentSocket)
        defer { again.close() }
        try again.ping()
    }

    @Test("thaw watchdog: the freezing client goes away without thawing; run(after: 2) in a thread thaws the guest",
          .timeLimit(.minutes(10)))
    func watchdogThawsAfterClientIsGone() throws {
        let vm = try AgentVM("watchdog")
        defer { vm.stop() }
        let cairn = try vm.agent()
        #expect(try cairn.freeze() >= 1)
        cairn.close()   // as if Cairn died here, the guest frozen

        let start = MonotonicDeadline.now()
        let socket = vm.agentSocket
        let watchdog = Background { try ThawWatchdog.thawWhenDue(agentSocket: socket, after: 2) }
        let outcome = try #require(watchdog.wait(timeout: 20), "the watchdog finishes")
        let took = elapsed(since: start)
        #expect(try outcome.get() == 1, "it thawed the one frozen file system")
        #expect(took >= 2 && took < 10, "it slept 2 s first, then thawed promptly (took \(took) s)")
        let check = try GuestAgentClient.connect(path: vm.agentSocket)
        defer { check.close() }
        #expect(try check.fsfreezeStatus() == "thawed")
    }

    @Test("thaw watchdog: waits while the (hung) freezing client still holds the agent socket, thaws once it is gone",
          .timeLimit(.minutes(10)))
    func watchdogWaitsForTheHolder() throws {
        let vm = try AgentVM("watchdog-holder")
        defer { vm.stop() }
        let cairn = try vm.agent()
        #expect(try cairn.freeze() >= 1)
        let socket = vm.agentSocket
        let watchdog = Background { try ThawWatchdog.run(agentSocket: socket, after: 0.5) }
        usleep(3_000_000)
        #expect(!watchdog.isDone, "the agent serves one client at a time: the watchdog waits")
        #expect(try cairn.fsfreezeStatus() == "frozen", "nobody thawed behind the holder's back")
        let closed = MonotonicDeadline.now()
        cairn.close()   // the holder dies
        let outcome = try #require(watchdog.wait(timeout: 15), "the watchdog finishes once the socket is free")
        try outcome.get()
        #expect(elapsed(since: closed) < 8)
        let check = try GuestAgentClient.connect(path: vm.agentSocket)
        defer { check.close() }
        #expect(try check.fsfreezeStatus() == "thawed")
    }
}

// MARK: - Against scripted agents and dead sockets

@Suite("Guest agent client: protocol, errors and timeouts")
struct GuestAgentClientTests {
    @Test("a socket that accepts and never answers: connect fails promptly with a timeout naming the socket and qemu-ga")
    func silentAgentTimesOut() throws {
        let dir = try TempDir("qga-silent")
        let fake = try FakeAgent(path: dir.file("qga.sock")) { _, _, _ in .silence }
        defer { fake.stop() }
        let start = MonotonicDeadline.now()
        do {
            _ = try GuestAgentClient.connect(path: fake.path, timeout: 1)
            Issue.record("connected to a silent agent")
        } catch let e as CairnError {
            #expect(e.message.contains("guest-sync-delimited") && e.message.contains("no reply within 1 s"), "\(e)")
            #expect(e.path == fake.path)
            #expect(e.hint?.contains("qemu-ga") == true && e.hint?.contains("org.qemu.guest_agent.0") == true, "\(e)")
        }
        #expect(elapsed(since: start) < 3)
        #expect(fake.seen("guest-sync-delimited") == 1)
    }

    @Test("a socket that never accepts (the queue holds the connection): connect times out promptly")
    func neverAcceptedTimesOut() throws {
        let dir = try TempDir("qga-queued")
        let fake = try FakeAgent(path: dir.file("qga.sock"), accepting: false)
        defer { fake.stop() }
        let start = MonotonicDeadline.now()
        #expect(throws: CairnError.self) { _ = try GuestAgentClient.connect(path: fake.path, timeout: 0.5) }
        #expect(elapsed(since: start) < 2.5)
    }

    @Test("no socket, or no listener: an immediate error with the chardev/virtserialport hint")
    func missingSocket() throws {
        let dir = try TempDir("qga-missing")
        let start = MonotonicDeadline.now()
        do {
            _ = try GuestAgentClient.connect(path: dir.file("none.sock"), timeout: 5)
            Issue.record("connected to nothing")
        } catch let e as CairnError {
            #expect(e.code == .notFound)
            #expect(e.hint?.contains("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0") == true, "\(e)")
        }
        // A socket file whose listener is gone.
        let stale = dir.file("stale.sock")
        try FakeAgent(path: stale, accepting: false).stop(keepingFile: true)
        #expect(throws: CairnError.self) { _ = try GuestAgentClient.connect(path: stale, timeout: 5) }
        #expect(elapsed(since: start) < 1)
    }

    @Test("resync skips stale replies, the agent's complaint about 0xFF, stale sentinels with a wrong id or garbage")
    func resyncSkipsStaleData() throws {
        let dir = try TempDir("qga-stale")
        let fake = try FakeAgent(path: dir.file("qga.sock")) { command, arguments, _ in
            guard command == "guest-sync-delimited" else {
                return command == "guest-fsfreeze-status" ? .line(#"{"return": "thawed"}"#) : .standard
            }
            let id = (arguments?["id"] as? NSNumber)?.int64Value ?? 0
            var bytes = Array(#"{"return": "a previous client's reply"}"#.utf8) + [0x0A]
            bytes += [0xFF] + Array(#"{"return": 7}"#.utf8) + [0x0A]                 // a stale sync's reply
            bytes += [0xFF] + Array("garbage behind a stale sentinel\n".utf8)
            bytes += Array(#"{"return": "half a line"#.utf8)                        // cut short by ...
            bytes += [0xFF] + Array("{\"return\": \(id)}\r\n".utf8)                    // ... ours
            return .raw(bytes)
        }
        defer { fake.stop() }
        let agent = try GuestAgentClient.connect(path: fake.path, timeout: 5)
        defer { agent.close() }
        #expect(try agent.fsfreezeStatus() == "thawed")
        #expect(fake.seen("guest-sync-delimited") == 1, "in sync after one resync")
    }

    @Test("error replies name the command, the socket, the agent's class and description")
    func errorReplies() throws {
        let dir = try TempDir("qga-errors")
        let fake = try FakeAgent(path: dir.file("qga.sock")) { command, _, _ in
            switch command {
            case "guest-fsfreeze-freeze": .line(#"{"error": {"class": "GenericError", "desc": "failed to freeze /mnt: Operation not supported"}}"#)
            case "guest-fsfreeze-thaw": .line(#"{"error": {"class": "CommandNotFound", "desc": "The command guest-fsfreeze-thaw has not been found"}}"#)
            default: .standard
            }
        }
        defer { fake.stop() }
        let agent = try GuestAgentClient.connect(path: fake.path)
        defer { agent.close() }
        do {
            try agent.freeze()
            Issue.record("freeze succeeded")
        } catch let e as CairnError {
            #expect(e.code == .io)
            #expect(e.message == "guest agent guest-fsfreeze-freeze failed: GenericError: failed to freeze /mnt: Operation not supported")
            #expect(e.path == fake.path)
            #expect(e.hint != nil)
        }
        do {
            try agent.thaw()
            Issue.record("thaw succeeded")
        } catch let e as CairnError {
            #expect(e.code == .unsupported, "CommandNotFound")
            #expect(e.message.contains("CommandNotFound") && e.message.contains("guest-fsfreeze-thaw"))
        }
        try agent.ping()
        #expect(fake.seen("guest-sync-delimited") == 1, "an error reply keeps the stream in sync")
    }

    @Test("garbled and unexpected replies throw (never trap) and the next command resyncs")
    func garbledReplies() throws {
        let dir = try TempDir("qga-garbled")
        let fake = try FakeAgent(path: dir.file("qga.sock")) { command, _, seen in
            switch (command, seen) {
            case ("guest-ping", 1): .line("this is not JSON")
            case ("guest-ping", 2): .line(#"["an", "array"]"#)
            case ("guest-ping", 3): .line(#"{"neither": "return nor error"}"#)
            case ("guest-fsfreeze-status", 1): .line(#"{"return": 42}"#)
            case ("guest-fsfreeze-status", _): .line(#"{"return": "melting"}"#)
            case ("guest-fsfreeze-freeze", _): .line(#"{"return": "three"}"#)
            case ("guest-fsfreeze-thaw", _): .line(#"{"return": 1.5}"#)
            default: .standard
            }
        }
        defer { fake.stop() }
        let agent = try GuestAgentClient.connect(path: fake.path)
        defer { agent.close() }
        for expected in ["not a JSON object: this is not JSON", "not a JSON object: [", "neither return nor error"] {
            do {
                try agent.ping()
                Issue.record("a garbled ping reply was accepted")
            } catch let e as CairnError {
                #expect(e.message.contains(expected), "\(e)")
            }
        }
        #expect(throws: CairnError.self) { try agent.fsfreezeStatus() }
        #expect(throws: CairnError.self) { try agent.fsfreezeStatus() }
        #expect(throws: CairnError.self) { try agent.freeze() }
        #expect(throws: CairnError.self) { try agent.thaw() }
        try agent.ping()
        #expect(fake.seen("guest-sync-delimited") == 4, "each broken reply costs one resync, the others none")
    }

    @Test("a command timeout is prompt; the late reply is dropped by the next command's resync")
    func commandTimeoutThenResync() throws {
        let dir = try TempDir("qga-timeout")
        let fake = try FakeAgent(path: dir.file("qga.sock")) { command, _, seen in
            switch (command, seen) {
            case ("guest-fsfreeze-status", 1): .delayed(1.0, #"{"return": "frozen"}"#)
            case ("guest-fsfreeze-status", _): .line(#"{"return": "thawed"}"#)
            default: .standard
            }
        }
        defer { fake.stop() }
        let agent = try GuestAgentClient.connect(path: fake.path)
        defer { agent.close() }
        let start = MonotonicDeadline.now()
        do {
            _ = try agent.fsfreezeStatus(timeout: 0.3)
            Issue.record("no timeout")
        } catch let e as CairnError {
            #expect(e.message == "guest agent guest-fsfreeze-status: no reply within 0.3 s", "\(e)")
            #expect(e.hint?.contains("qemu-ga") == true)
        }
        #expect(elapsed(since: start) < 0.9)
        #expect(try agent.fsfreezeStatus(timeout: 5) == "thawed", "the late \"frozen\" is not taken for this reply")
        #expect(fake.seen("guest-sync-delimited") == 2)
    }

    @Test("close() from another thread wakes a command waiting for its reply")
    func closeWakesAWaiter() throws {
        let dir = try TempDir("qga-close")
        let fake = try FakeAgent(path: dir.file("qga.sock")) { command, _, _ in command == "guest-ping" ? .silence : .standard }
        defer { fake.stop() }
        let agent = try GuestAgentClient.connect(path: fake.path)
        let start = MonotonicDeadline.now()
        let waiter = Background { try agent.ping(timeout: 20) }
        usleep(300_000)
        agent.close()
        let outcome = try #require(waiter.wait(timeout: 5))
        #expect(throws: CairnError.self) { try outcome.get() }
        #expect(elapsed(since: start) < 3)
        #expect(throws: CairnError.self) { try agent.ping() }
        agent.close()
    }

    @Test("an agent that goes away mid-command: an error, not a hang")
    func agentGoesAway() throws {
        let dir = try TempDir("qga-gone")
        let fake = try FakeAgent(path: dir.file("qga.sock")) { command, _, _ in command == "guest-ping" ? .silence : .standard }
        let agent = try GuestAgentClient.connect(path: fake.path)
        defer { agent.close() }
        let waiter = Background { try agent.ping(timeout: 20) }
        usleep(200_000)
        fake.stop()
        let outcome = try #require(waiter.wait(timeout: 5))
        do {
            try outcome.get()
            Issue.record("ping succeeded")
        } catch {
            #expect(error.message.contains("closed"), "\(error)")
        }
    }
}
