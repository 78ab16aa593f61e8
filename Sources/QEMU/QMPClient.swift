// The QEMU target: talking to a running QEMU (qemu-system or qemu-storage-daemon) over QMP,
// and the block-job sequences built on it (docs/QMP.md).
import CairnCore
import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One asynchronous QMP event, as QEMU sent it.
public struct QMPEvent: @unchecked Sendable, CustomStringConvertible {
    // @unchecked: `data` holds JSONSerialization values (immutable Foundation objects).
    public let name: String
    public let data: [String: Any]
    /// Seconds since the epoch, from the event's own timestamp.
    public let timestamp: Double?

    public func string(_ key: String) -> String? { data[key] as? String }

    public var description: String {
        let json = (try? JSONSerialization.data(withJSONObject: data, options: [.sortedKeys])).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return "\(name) \(json)"
    }
}

/// A QMP client on a unix socket: greeting, capability negotiation, commands with ids,
/// error replies as `CairnError`, events kept in arrival order until someone waits for them.
///
/// The API is synchronous. One background thread reads the socket and files each message
/// either as the reply to its command id or as an event; callers block (with a timeout) on a
/// condition until theirs arrives. Every wait has a timeout; a closed connection wakes
/// every waiter with an error.
public final class QMPClient: @unchecked Sendable {
    // @unchecked: all mutable state below is guarded by `cond`; `fd` is written only before
    // the reader starts and in `close()`, after the reader has stopped.
    public let path: String
    /// Timeout (seconds) of a command when `execute` is not given one.
    public let commandTimeout: Double
    /// The greeting's `QMP` object (version, capabilities).
    public private(set) var greeting: [String: Any] = [:]

    private var fd: Int32
    private let cond = NSCondition()
    private var replies: [Int: [String: Any]] = [:]
    private var abandoned: Set<Int> = []
    private var events: [QMPEvent] = []
    private var greetingMessage: [String: Any]?
    private var closedReason: String?
    private var readerFinished = false
    private var nextID = 1
    private let writeLock = NSLock()
    /// Events kept at most; older ones are dropped (a long-lived connection gets many).
    private let eventLimit = 10_000

    /// Connects to the QMP socket at `path`, retrying while it does not exist or refuses
    /// connections (QEMU still starting) until `timeout` seconds have passed, then reads the
    /// greeting and negotiates capabilities.
    public static func connect(path: String, timeout: Double = 30, commandTimeout: Double = 60) throws -> QMPClient {
        let deadline = Date().addingTimeInterval(timeout)
        let fd = try connectSocket(path: path, deadline: deadline)
        let client = QMPClient(path: path, fd: fd, commandTimeout: commandTimeout)
        client.startReader()
        do {
            client.greeting = try client.waitForGreeting(deadline: deadline)
            try client.execute("qmp_capabilities", timeout: max(1, deadline.timeIntervalSinceNow))
        } catch {
            client.close()
            throw error
        }
        return client
    }

    private init(path: String, fd: Int32, commandTimeout: Double) {
        self.path = path
        self.fd = fd
        self.commandTimeout = commandTimeout
        // struct ucred { pid_t pid; uid_t uid; gid_t gid; } (Glibc hides it behind _GNU_SOURCE).
        var cred: (pid: Int32, uid: UInt32, gid: UInt32) = (0, 0, 0)
        var len = socklen_t(MemoryLayout<(Int32, UInt32, UInt32)>.size)
        if getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0, cred.pid > 0 { peerPID = cred.pid }
    }

    /// The process id of QEMU at the other end of the socket (SO_PEERCRED), if known.
    public private(set) var peerPID: Int32?

    deinit { close() }

    /// The QEMU version from the greeting, "major.minor.micro".
    public var qemuVersion: String? {
        guard let v = (greeting["version"] as? [String: Any])?["qemu"] as? [String: Any],
              let major = (v["major"] as? NSNumber)?.intValue, let minor = (v["minor"] as? NSNumber)?.intValue,
              let micro = (v["micro"] as? NSNumber)?.intValue else { return nil }
        return "\(major).\(minor).\(micro)"
    }

    /// Runs `command` and returns its `return` value (a dictionary, an array, ...).
    /// An `error` reply throws a `CairnError` whose message names the command, the QMP error
    /// class and QEMU's description; no reply within the timeout throws too.
    @discardableResult
    public func execute(_ command: String, arguments: [String: Any]? = nil, timeout: Double? = nil) throws -> Any {
        let limit = timeout ?? commandTimeout
        cond.lock()
        let id = nextID
        nextID += 1
        let closed = closedReason
        cond.unlock()
        if let closed { throw CairnError(.io, "QMP \(command): the connection is closed (\(closed))", path: path) }

        var message: [String: Any] = ["execute": command, "id": id]
        if let arguments { message["arguments"] = arguments }
        guard JSONSerialization.isValidJSONObject(message) else {
            throw CairnError(.usage, "QMP \(command): the arguments are not JSON values", path: path)
        }
        var bytes = try JSONSerialization.data(withJSONObject: message)
        bytes.append(0x0A)
        try send(bytes, command: command)

        let deadline = Date().addingTimeInterval(limit)
        cond.lock()
        defer { cond.unlock() }
        while true {
            if let reply = replies.removeValue(forKey: id) {
                if let error = reply["error"] as? [String: Any] {
                    let cls = error["class"] as? String ?? "UnknownError"
                    let desc = error["desc"] as? String ?? "(no description)"
                    let code: CairnError.Code = cls == "CommandNotFound" ? .unsupported : cls == "DeviceNotFound" ? .notFound : .io
                    throw CairnError(code, "QMP \(command) failed: \(cls): \(desc)", path: path)
                }
                return reply["return"] ?? [String: Any]()
            }
            if let closed = closedReason {
                throw CairnError(.io, "QMP \(command): the connection closed before the reply (\(closed))", path: path)
            }
            if Date() >= deadline {
                abandoned.insert(id)
                throw CairnError(.io, "QMP \(command): no reply within \(Self.seconds(limit))", path: path,
                                 hint: "QEMU may be hung or busy; the command may still take effect")
            }
            _ = cond.wait(until: deadline)
        }
    }

    /// The first event not yet taken whose name is in `names` and that `matching` accepts,
    /// removed from the queue; nil when none arrives within `timeout` seconds. Events that
    /// arrived before the call count (nothing is missed between a command and the wait).
    public func nextEvent(names: Set<String>, timeout: Double, matching: (QMPEvent) -> Bool = { _ in true }) throws -> QMPEvent? {
        let deadline = Date().addingTimeInterval(timeout)
        cond.lock()
        defer { cond.unlock() }
        while true {
            if let i = events.firstIndex(where: { names.contains($0.name) && matching($0) }) {
                return events.remove(at: i)
            }
            if let closed = closedReason {
                throw CairnError(.io, "QMP: the connection closed while waiting for \(names.sorted().joined(separator: "/")) (\(closed))", path: path)
            }
            if Date() >= deadline { return nil }
            _ = cond.wait(until: deadline)
        }
    }

    /// Like `nextEvent`, but no event within `timeout` seconds throws.
    @discardableResult
    public func waitForEvent(name: String, matching: (QMPEvent) -> Bool = { _ in true }, timeout: Double) throws -> QMPEvent {
        guard let e = try nextEvent(names: [name], timeout: timeout, matching: matching) else {
            throw CairnError(.io, "QMP: no \(name) event within \(Self.seconds(timeout))", path: path)
        }
        return e
    }

    /// The events received and not yet taken by a wait, oldest first.
    public var pendingEvents: [QMPEvent] {
        cond.lock()
        defer { cond.unlock() }
        return events
    }

    /// Whether the connection is still open (QEMU has not gone away).
    public var isConnected: Bool {
        cond.lock()
        defer { cond.unlock() }
        return closedReason == nil
    }

    /// Closes the connection (idempotent); waiters get an error. Waits for the reader thread.
    public func close() {
        cond.lock()
        if fd < 0 {
            cond.unlock()
            return
        }
        if closedReason == nil { closedReason = "closed by Cairn" }
        let socket = fd
        cond.broadcast()
        cond.unlock()
        _ = shutdown(socket, Int32(SHUT_RDWR))
        cond.lock()
        let deadline = Date().addingTimeInterval(5)
        while !readerFinished && cond.wait(until: deadline) {}
        let finished = readerFinished
        fd = -1
        cond.unlock()
        // The reader is blocked in read() on this descriptor until shutdown wakes it; close
        // only once it is out, so the number cannot be reused under it.
        if finished { _ = Glibc.close(socket) }
    }

    // MARK: - Socket

    private static func connectSocket(path: String, deadline: Date) throws -> Int32 {
        let address = try UnixSocketAddress(path: path, what: "QMP")
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw CairnError.errno("socket", errno, path: path) }
            let err = address.connect(fd)
            if err == 0 {
                // Writes never block forever (QEMU not reading): they time out instead.
                var tv = timeval(tv_sec: 30, tv_usec: 0)
                _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
                return fd
            }
            _ = Glibc.close(fd)
            guard err == ENOENT || err == ECONNREFUSED || err == EAGAIN else {
                throw CairnError.errno("connect to QMP socket", err, path: path)
            }
            if Date() >= deadline {
                throw CairnError(.io, "cannot connect to the QMP socket: \(String(cString: strerror(err)))", path: path,
                                 hint: "is QEMU running with -qmp unix:\(path),server=on,wait=off?")
            }
            usleep(50_000)
        }
    }

    private func send(_ bytes: Data, command: String) throws {
        writeLock.lock()
        defer { writeLock.unlock() }
        cond.lock()
        let socket = fd
        cond.unlock()
        guard socket >= 0 else { throw CairnError(.io, "QMP \(command): the connection is closed", path: path) }
        try bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            var done = 0
            while done < raw.count {
                let n = Glibc.send(socket, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EAGAIN || errno == EWOULDBLOCK {
                        throw CairnError(.io, "QMP \(command): QEMU did not accept the command within 30 s", path: path)
                    }
                    throw CairnError.errno("send to QMP socket", errno, path: path)
                }
                done += n
            }
        }
    }

    private func waitForGreeting(deadline: Date) throws -> [String: Any] {
        cond.lock()
        defer { cond.unlock() }
        while true {
            if let g = greetingMessage { return g["QMP"] as? [String: Any] ?? [:] }
            if let closed = closedReason { throw CairnError(.io, "QMP: the connection closed before the greeting (\(closed))", path: path) }
            if Date() >= deadline {
                throw CairnError(.io, "QMP: no greeting within the connect timeout", path: path,
                                 hint: "another client may hold the monitor (a QMP socket serves one client at a time)")
            }
            _ = cond.wait(until: deadline)
        }
    }

    // MARK: - Reader

    private func startReader() {
        let thread = Thread { [self] in self.readLoop() }
        thread.name = "cairn-qmp-reader"
        thread.start()
    }

    private func readLoop() {
        cond.lock()
        let socket = fd
        cond.unlock()
        var pending = Data()
        var buffer = [UInt8](repeating: 0, count: 65536)
        var reason = "QEMU closed the connection"
        loop: while true {
            let n = buffer.withUnsafeMutableBytes { read(socket, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                reason = "read failed: \(String(cString: strerror(errno)))"
                break
            }
            if n == 0 { break }
            pending.append(contentsOf: buffer[0..<n])
            // QMP messages are JSON objects, one a line (QEMU ends each with CRLF).
            while let newline = pending.firstIndex(of: 0x0A) {
                let line = pending[pending.startIndex..<newline]
                pending.removeSubrange(pending.startIndex...newline)
                guard line.contains(where: { $0 != 0x0D && $0 != 0x20 }) else { continue }
                guard let object = (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any] else {
                    reason = "QEMU sent something that is not a JSON object: \(String(decoding: line.prefix(200), as: UTF8.self))"
                    break loop
                }
                file(object)
            }
            if pending.count > 64 << 20 {
                reason = "a QMP message longer than 64 MiB"
                break
            }
        }
        cond.lock()
        if closedReason == nil { closedReason = reason }
        readerFinished = true
        cond.broadcast()
        cond.unlock()
    }

    private func file(_ object: [String: Any]) {
        cond.lock()
        defer { cond.unlock() }
        if let name = object["event"] as? String {
            var timestamp: Double?
            if let t = object["timestamp"] as? [String: Any], let s = (t["seconds"] as? NSNumber)?.doubleValue {
                timestamp = s + ((t["microseconds"] as? NSNumber)?.doubleValue ?? 0) / 1e6
            }
            events.append(QMPEvent(name: name, data: object["data"] as? [String: Any] ?? [:], timestamp: timestamp))
            if events.count > eventLimit { events.removeFirst(events.count - eventLimit) }
        } else if object["QMP"] != nil {
            greetingMessage = object
        } else if let id = (object["id"] as? NSNumber)?.intValue {
            if abandoned.remove(id) == nil { replies[id] = object }
        }
        // Replies without an id (to commands we never send) are ignored.
        cond.broadcast()
    }

    static func seconds(_ s: Double) -> String {
        s == s.rounded() ? "\(Int(s)) s" : String(format: "%.1f s", s)
    }
}
