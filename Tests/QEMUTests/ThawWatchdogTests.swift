import CairnCore
import CairnTestSupport
import Foundation
import Testing
@testable import QEMU
#if canImport(Glibc)
import Glibc
#endif

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
