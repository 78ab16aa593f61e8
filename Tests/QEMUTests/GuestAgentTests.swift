import CairnCore
import CairnTestSupport
import Foundation
import Testing
@testable import QEMU
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Fixtures

/// The guest-agent VM of scripts/make-boot-vm.sh (boot-agent.raw: qemu-ga on
/// org.qemu.guest_agent.0, an ext4 mounted on /mnt/data), built once per machine into the
/// cache the other VM tests share (never deleted here).
enum AgentBootImage {
    static let directory = "/tmp/cairn-test-bootvm"

    private static let built: Result<String, CairnError> = {
        let root = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        do {
            try Tool.run(root.appendingPathComponent("scripts/make-boot-vm.sh").path, [directory])
            return .success((directory as NSString).appendingPathComponent("boot-agent.raw"))
        } catch let e as CairnError {
            return .failure(e)
        } catch {
            return .failure(CairnError(.io, "make-boot-vm.sh: \(error)"))
        }
    }()

    static func path() throws -> String { try built.get() }
}

/// qemu-system-x86_64 (TCG) booting boot-agent.raw through a qcow2 overlay (the cached image is
/// never written), its serial console in a file and the agent channel on `agentSocket`.
/// Killed (SIGKILL) by `stop()` or when released.
final class AgentVM: @unchecked Sendable {
    // @unchecked: used from the test's thread only.
    let dir: TempDir
    let agentSocket: String
    let serialLog: String
    private let process: Process
    private let stderrPath: String
    private(set) var started = 0.0

    init(_ name: String) throws {
        let image = try AgentBootImage.path()
        dir = try TempDir("qga-\(name)")
        let overlay = dir.file("disk.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", image, "-F", "raw", overlay])
        agentSocket = dir.file("qga.sock")
        serialLog = dir.file("serial.log")
        stderrPath = dir.file("qemu.err")
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process = Process()
        process.executableURL = URL(fileURLWithPath: try Tool.which("qemu-system-x86_64"))
        process.arguments = [
            "-accel", "tcg", "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", "file:\(serialLog)",
            "-drive", "file=\(overlay),format=qcow2,if=virtio",
            "-chardev", "socket,path=\(agentSocket),server=on,wait=off,id=qga0",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=\(GuestAgentClient.channelName)",
        ]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle(forWritingAtPath: stderrPath)
        try process.run()
        started = MonotonicDeadline.now()
    }

    var serial: String { (try? String(contentsOfFile: serialLog, encoding: .utf8)) ?? "" }

    /// The last "CAIRN-TICK n" on the console (0 before the first).
    var lastTick: Int {
        serial.split(whereSeparator: \.isNewline).compactMap { line -> Int? in
            guard line.hasPrefix("CAIRN-TICK ") else { return nil }
            return Int(line.dropFirst("CAIRN-TICK ".count).trimmingCharacters(in: .whitespaces))
        }.last ?? 0
    }

    /// Waits for `marker` on the serial console; returns the seconds since QEMU started.
    @discardableResult
    func waitForSerial(_ marker: String, timeout: Double = 30) throws -> Double {
        let deadline = MonotonicDeadline(seconds: timeout)
        while true {
            let log = serial
            if log.contains(marker) { return MonotonicDeadline.now() - started }
            if log.contains("CAIRN-AGENT-FAILED") || !process.isRunning || deadline.expired {
                let err = (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? ""
                throw CairnError(.io, "the agent VM did not print \(marker) within \(timeout) s; serial: \(log.suffix(600)); qemu: \(err)")
            }
            usleep(50_000)
        }
    }

    /// Boots to CAIRN-AGENT-UP and connects.
    func agent(timeout: Double = 30) throws -> GuestAgentClient {
        try waitForSerial("CAIRN-AGENT-UP", timeout: timeout)
        return try GuestAgentClient.connect(path: agentSocket)
    }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stop() }
}

/// A scripted stand-in for qemu-ga on a unix socket: serves one connection at a time (like
/// QEMU's chardev), answers each leading 0xFF with the parse error the real agent sends, and
/// each command line with what `handler` says (given the command, its arguments and how many
/// times it has been seen). `accepting: false` never accepts (connections wait in the queue).
final class FakeAgent: @unchecked Sendable {
    enum Reply {
        /// guest-sync-delimited: 0xFF and the echoed id; other commands: `{"return": {}}`.
        case standard
        /// This JSON text as one line.
        case line(String)
        /// These bytes as they are.
        case raw([UInt8])
        /// The line, after a pause.
        case delayed(Double, String)
        /// Nothing.
        case silence
    }

    let path: String
    private let listener: Int32
    private let accepting: Bool
    private let stopped = Locked(false)
    private let connection = Locked<Int32>(-1)
    private let counts = Locked<[String: Int]>([:])

    init(path: String, accepting: Bool = true,
         handler: @escaping @Sendable (_ command: String, _ arguments: [String: Any]?, _ seen: Int) -> Reply = { _, _, _ in .standard }) throws {
        self.path = path
        self.accepting = accepting
        unlink(path)
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: path.utf8)
            raw[path.utf8.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(listener, 1) == 0 else { throw CairnError.errno("bind", errno, path: path) }
        guard accepting else { return }
        let fd = listener
        let connection = self.connection
        let counts = self.counts
        Thread {
            while true {
                let c = accept(fd, nil, nil)
                guard c >= 0 else {
                    if errno == EINTR { continue }
                    close(fd)   // stop() shut it down; closed here, where nothing can still use it
                    return
                }
                _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                connection.withLock { $0 = c }
                FakeAgent.serve(c, counts: counts, handler: handler)
                connection.withLock { $0 = -1 }
                close(c)
            }
        }.start()
    }

    private static func serve(_ c: Int32, counts: Locked<[String: Int]>,
                              handler: @Sendable (String, [String: Any]?, Int) -> Reply) {
        func say(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
        var line: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(c, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            for byte in chunk[0..<n] {
                if byte == 0xFF {
                    line.removeAll()
                    say(Array(#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#.utf8) + [0x0A])
                    continue
                }
                guard byte == 0x0A else { line.append(byte); continue }
                defer { line.removeAll() }
                guard let object = (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any],
                      let command = object["execute"] as? String else { continue }
                let arguments = object["arguments"] as? [String: Any]
                let seen = counts.withLock { counts -> Int in
                    counts[command, default: 0] += 1
                    return counts[command]!
                }
                switch handler(command, arguments, seen) {
                case .standard:
                    if command == "guest-sync-delimited" {
                        let id = (arguments?["id"] as? NSNumber)?.int64Value ?? -1
                        say([0xFF] + Array(#"{"return": \#(id)}"#.utf8) + [0x0A])
                    } else {
                        say(Array(#"{"return": {}}"#.utf8) + [0x0A])
                    }
                case .line(let text): say(Array(text.utf8) + [0x0A])
                case .raw(let bytes): say(bytes)
                case .delayed(let seconds, let text):
                    usleep(UInt32(seconds * 1e6))
                    say(Array(text.utf8) + [0x0A])
                case .silence: break
                }
            }
        }
    }

    func seen(_ command: String) -> Int { counts.withLock { $0[command] ?? 0 } }

    /// Stops listening and drops the connection (idempotent); `keepingFile` leaves the socket
    /// file behind, a stale socket nobody listens on.
    func stop(keepingFile: Bool = false) {
        guard stopped.withLock({ was in defer { was = true }; return !was }) else { return }
        if accepting {
            _ = shutdown(listener, Int32(SHUT_RDWR))   // wakes accept(); the thread closes it
        } else {
            close(listener)
        }
        connection.withLock { if $0 >= 0 { _ = shutdown($0, Int32(SHUT_RDWR)) } }
        if !keepingFile { unlink(path) }
    }

    deinit { stop() }
}

/// Runs `body` on a thread; `wait` returns its outcome, or nil if it is not done in time.
final class Background<T: Sendable>: @unchecked Sendable {
    private let result = Locked<Result<T, CairnError>?>(nil)
    private let done = DispatchSemaphore(value: 0)

    init(_ body: @escaping @Sendable () throws -> T) {
        let result = self.result
        let done = self.done
        Thread {
            do {
                let value = try body()
                result.withLock { $0 = .success(value) }
            } catch let e as CairnError {
                result.withLock { $0 = .failure(e) }
            } catch {
                result.withLock { $0 = .failure(CairnError(.io, "\(error)")) }
            }
            done.signal()
        }.start()
    }

    var isDone: Bool { result.withLock { $0 != nil } }

    func wait(timeout: Double) -> Result<T, CairnError>? {
        guard done.wait(timeout: .now() + timeout) == .success else { return nil }
        done.signal()
        return result.withLock { $0 }
    }
}

private func elapsed(since start: Double) -> Double { MonotonicDeadline.now() - start }

// MARK: - Against qemu-ga in a VM

/// Alone each test takes about 5 s; in the full parallel run a TCG guest starved of CPU once
/// took 249 s for the freeze test (every step inside its own client timeout), so the time
/// limits only catch a real hang.
@Suite("Guest agent: qemu-ga in a TCG VM", .serialized)
struct GuestAgentVMTests {
    @Test("ping, status, freeze of the guest's ext4, status frozen, a second freeze refused, thaw, status thawed",
          .timeLimit(.minutes(5)))
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
          .timeLimit(.minutes(5)))
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
          .timeLimit(.minutes(5)))
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

// MARK: - Thaw watchdog process

@Suite("Thaw watchdog: spawn and cancel")
struct ThawWatchdogSpawnTests {
    @Test("spawn starts EXECUTABLE thaw-watchdog --socket PATH --after S in its own session, on /dev/null, with no inherited descriptors; cancel kills and reaps it")
    func spawnAndCancel() throws {
        let dir = try TempDir("qga-spawn")
        let script = dir.file("fake-cairn")
        let argsFile = dir.file("args")
        try """
        #!/bin/sh
        printf '%s\\n' "$@" >"\(argsFile).tmp" && mv "\(argsFile).tmp" "\(argsFile)"
        exec sleep 60
        """.write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        // A descriptor without close-on-exec, which the child must not get.
        let leak = open("/dev/null", O_RDONLY)
        defer { close(leak) }

        let dog = try ThawWatchdog.spawn(agentSocket: "/run/vm/qga.sock", after: 2.5, executable: script)
        defer { dog.cancel() }
        let pid = dog.pid
        #expect(pid > 0)
        let deadline = MonotonicDeadline(seconds: 10)
        while (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) != "sleep\n" && !deadline.expired { usleep(20_000) }
        let args = try String(contentsOfFile: argsFile, encoding: .utf8).split(separator: "\n").map(String.init)
        #expect(args == ["thaw-watchdog", "--socket", "/run/vm/qga.sock", "--after", "2.5"])

        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.index(after: try #require(stat.lastIndex(of: ")")))...].split(separator: " ")
        #expect(Int32(fields[1]) == getpid(), "a child of this process until it is reaped")
        #expect(Int32(fields[2]) == pid, "its own process group")
        #expect(Int32(fields[3]) == pid, "its own session (setsid)")
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").sorted()
        #expect(fds == ["0", "1", "2"], "nothing inherited but the standard three")
        for fd in ["0", "1", "2"] {
            #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)") == "/dev/null")
        }
        let sigBlk = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
            .split(separator: "\n").first { $0.hasPrefix("SigBlk:") }
        #expect(sigBlk?.hasSuffix("0000000000000000") == true, "an empty signal mask: \(sigBlk ?? "")")

        dog.cancel()
        #expect(kill(pid, 0) == -1 && errno == ESRCH, "killed and reaped")
        dog.cancel()
    }

    @Test("cancel reaps a watchdog that already finished; whole seconds are passed without a fraction")
    func cancelAfterExit() throws {
        let dir = try TempDir("qga-spawn-exit")
        let script = dir.file("fake-cairn")
        let argsFile = dir.file("args")
        try "#!/bin/sh\nprintf '%s\\n' \"$@\" >\"\(argsFile)\"\n".write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        let dog = try ThawWatchdog.spawn(agentSocket: "/tmp/x.sock", after: 30, executable: script)
        let deadline = MonotonicDeadline(seconds: 10)
        while (try? String(contentsOfFile: "/proc/\(dog.pid)/stat", encoding: .utf8))?.contains(") Z ") != true && !deadline.expired {
            usleep(20_000)
        }
        #expect(try String(contentsOfFile: argsFile, encoding: .utf8).hasSuffix("--after\n30\n"))
        dog.cancel()
        #expect(kill(dog.pid, 0) == -1 && errno == ESRCH, "the zombie is reaped")
    }

    @Test("spawn refuses a missing executable and a negative delay; the default executable is this process's file")
    func spawnErrors() throws {
        #expect(throws: CairnError.self) { _ = try ThawWatchdog.spawn(agentSocket: "/tmp/x.sock", after: 1, executable: "/nonexistent/cairn") }
        #expect(throws: CairnError.self) { _ = try ThawWatchdog.spawn(agentSocket: "/tmp/x.sock", after: -1, executable: "/bin/true") }
        #expect(throws: CairnError.self) { _ = try ThawWatchdog.spawn(agentSocket: "/tmp/x.sock", after: .infinity, executable: "/bin/true") }
        let me = try ThawWatchdog.currentExecutable()
        #expect(me.hasPrefix("/") && FileManager.default.isExecutableFile(atPath: me))
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") == me)
    }

    @Test("run gives up after its retry window when there is no agent, with a CairnError naming the socket")
    func runGivesUp() throws {
        let dir = try TempDir("qga-giveup")
        let socket = dir.file("qga.sock")
        let start = MonotonicDeadline.now()
        do {
            try ThawWatchdog.thawWhenDue(agentSocket: socket, after: 0.1, retryWindow: 1, attemptTimeout: 0.5)
            Issue.record("thawed nothing and succeeded")
        } catch let e as CairnError {
            #expect(e.path == socket)
            #expect(e.message.contains("could not thaw"), "\(e)")
        }
        #expect(elapsed(since: start) < 4)
    }
}

// MARK: - Wire format, without a socket

@Suite("Guest agent wire format")
struct GuestAgentDecoderTests {
    private func drain(_ d: inout GuestAgentDecoder) throws -> [[String: Any]] {
        var out: [[String: Any]] = []
        while let o = try d.next() { out.append(o) }
        return out
    }

    @Test("objects split across reads, several in one read, CRLF and blank lines")
    func framing() throws {
        var d = GuestAgentDecoder()
        d.feed(Array(#"{"return": "#.utf8))
        #expect(try d.next() == nil)
        d.feed(Array("1}\r\n\n  \n{\"return\": {}}\n{\"error\": {\"class\": \"X\"}}\n{\"ret".utf8))
        let objects = try drain(&d)
        #expect(objects.count == 3)
        #expect((objects[0]["return"] as? NSNumber)?.intValue == 1)
        #expect(objects[2]["error"] != nil)
        #expect(d.pendingCount == 5)
        d.feed(Array("urn\": 2}\n".utf8))
        #expect((try d.next()?["return"] as? NSNumber)?.intValue == 2)
        #expect(d.pendingCount == 0)
    }

    @Test("awaiting the sentinel drops everything before it; a sentinel while reading drops a partial line")
    func sentinel() throws {
        var d = GuestAgentDecoder()
        d.feed(Array("{\"return\": \"stale\"}\n".utf8))
        d.awaitSentinel()
        d.feed(Array("{\"return\": \"also stale\"}\n{\"err".utf8))
        #expect(d.state == .awaitingSentinel)
        #expect(try d.next() == nil)
        d.feed([0x7B, 0xFF] + Array("{\"return\": 5}\n{\"return\": \"cut".utf8))
        #expect(d.state == .reading)
        #expect((try d.next()?["return"] as? NSNumber)?.intValue == 5)
        d.feed([0xFF] + Array("{\"return\": 6}\n".utf8))
        #expect((try d.next()?["return"] as? NSNumber)?.intValue == 6)
        #expect(try d.next() == nil)
    }

    @Test("a line that is not a JSON object throws, and so does a line past the limit")
    func badLines() throws {
        var d = GuestAgentDecoder()
        d.feed(Array("[1, 2]\n".utf8))
        #expect(throws: GuestAgentDecoder.DecodeError.notAnObject("[1, 2]")) { try d.next() }
        var e = GuestAgentDecoder()
        e.feed(Array("{\"return\": \"".utf8))
        e.feed([UInt8](repeating: 0x61, count: GuestAgentDecoder.maxLine))
        #expect(throws: GuestAgentDecoder.DecodeError.lineTooLong(GuestAgentDecoder.maxLine + 12)) { try e.next() }
    }

    @Test("random bytes never trap")
    func fuzz() {
        var rng = SeededRandom(seed: 0x9A)
        for round in 0..<2000 {
            var d = GuestAgentDecoder()
            if round % 3 == 0 { d.awaitSentinel() }
            for _ in 0..<4 {
                var bytes = rng.bytes(Int(rng.next() % 64))
                // Mix in structure so parsing gets exercised, not only rejected.
                if rng.next() % 2 == 0 { bytes += Array("{\"return\": \(rng.next() % 100)}\n".utf8) }
                if rng.next() % 4 == 0 { bytes.insert(0xFF, at: Int(rng.next() % UInt64(bytes.count + 1))) }
                if rng.next() % 3 == 0 { bytes.append(0x0A) }
                d.feed(bytes)
                while true {
                    do {
                        guard try d.next() != nil else { break }
                    } catch {
                        d.awaitSentinel()
                        break
                    }
                }
            }
        }
    }
}
