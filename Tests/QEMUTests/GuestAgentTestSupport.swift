// Fixtures of the guest-agent tests: the agent VM, a scripted agent, a background runner.
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
    private let qemu: BackgroundTool
    private(set) var started = 0.0

    init(_ name: String) throws {
        let image = try AgentBootImage.path()
        dir = try TempDir("qga-\(name)")
        let overlay = dir.file("disk.qcow2")
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", image, "-F", "raw", overlay])
        agentSocket = dir.file("qga.sock")
        serialLog = dir.file("serial.log")
        qemu = try BackgroundTool("qemu-system-x86_64", [
            "-accel", "tcg", "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", "file:\(serialLog)",
            "-drive", "file=\(overlay),format=qcow2,if=virtio",
            "-chardev", "socket,path=\(agentSocket),server=on,wait=off,id=qga0",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=\(GuestAgentClient.channelName)",
        ], in: dir, stderrName: "qemu.err")
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
            if log.contains("CAIRN-AGENT-FAILED") || !qemu.isRunning || deadline.expired {
                let err = qemu.stderr
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

    func stop() { qemu.stop() }
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
        let bound = try UnixSocketAddress(path: path, what: "test agent").bind(listener)
        guard bound == 0, listen(listener, 1) == 0 else { throw CairnError.errno("bind", errno, path: path) }
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

func elapsed(since start: Double) -> Double { MonotonicDeadline.now() - start }
