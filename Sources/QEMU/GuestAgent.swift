// The QEMU guest agent (qemu-ga): a client for the agent's channel (docs/QMP.md, "Guest agent");
// the thaw watchdog that backs a freeze is in ThawWatchdog.swift.
import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Wire format

/// Splits the bytes qemu-ga sends into JSON objects.
///
/// The agent writes one JSON object a line: `{"return": VALUE}\n` or
/// `{"error": {"class": ..., "desc": ...}}\n`. Before its reply to `guest-sync-delimited` it
/// writes the sentinel byte 0xFF, which never occurs in UTF-8 text: a client that cannot trust
/// what is buffered (a new connection may receive a previous client's late replies; a reply it
/// gave up waiting for may still come) calls `awaitSentinel()`, and the decoder drops every
/// byte up to the next 0xFF. A 0xFF that arrives while reading also drops what came before it
/// (a half-received line belongs to the stream being abandoned).
///
/// Pure: no I/O. `GuestAgentClient` feeds it what it reads. A line that is not a JSON object,
/// or one longer than `maxLine`, throws; nothing traps on bad input.
struct GuestAgentDecoder {
    static let sentinel: UInt8 = 0xFF
    /// The longest line accepted (the commands Cairn sends have replies of a few bytes; the
    /// largest replies qemu-ga has, guest-file-read's base64, are bounded by the caller's count).
    static let maxLine = 16 << 20

    enum State: Equatable {
        /// Dropping everything until a sentinel byte.
        case awaitingSentinel
        /// Splitting lines into objects.
        case reading
    }

    enum DecodeError: Error, Equatable {
        /// The line (its first bytes, as text) is not a JSON object.
        case notAnObject(String)
        /// A line grew past `maxLine` bytes without a newline.
        case lineTooLong(Int)
    }

    private(set) var state: State = .reading
    private var buffer: [UInt8] = []
    /// Bytes of `buffer` already returned as lines.
    private var consumed = 0
    /// Where the search for the next newline resumes (a long line is scanned once).
    private var scanned = 0

    /// Bytes buffered and not yet returned (a partial line, or lines not yet taken).
    var pendingCount: Int { buffer.count - consumed }

    /// Forgets everything buffered and ignores input up to the next sentinel byte.
    mutating func awaitSentinel() {
        state = .awaitingSentinel
        clear()
    }

    mutating func feed(_ bytes: some BidirectionalCollection<UInt8>) {
        if let s = bytes.lastIndex(of: Self.sentinel) {
            // Everything before the last sentinel is stale, in either state.
            clear()
            buffer.append(contentsOf: bytes[bytes.index(after: s)...])
            state = .reading
        } else if state == .reading {
            buffer.append(contentsOf: bytes)
        }
    }

    /// The next complete object, or nil when more bytes are needed (or while awaiting the
    /// sentinel). Blank lines are skipped.
    mutating func next() throws(DecodeError) -> [String: Any]? {
        guard state == .reading else { return nil }
        while let newline = buffer[max(consumed, scanned)...].firstIndex(of: 0x0A) {
            let line = buffer[consumed..<newline]
            consumed = newline + 1
            scanned = consumed
            if let object = try Self.object(line) {
                compact()
                return object
            }
        }
        scanned = buffer.count
        compact()
        if buffer.count - consumed > Self.maxLine { throw .lineTooLong(buffer.count - consumed) }
        return nil
    }

    private mutating func clear() {
        buffer.removeAll(keepingCapacity: true)
        consumed = 0
        scanned = 0
    }

    private mutating func compact() {
        if consumed == buffer.count {
            clear()
        } else if consumed > 1 << 16 {
            buffer.removeSubrange(0..<consumed)
            scanned -= consumed
            consumed = 0
        }
    }

    /// nil for a blank line.
    private static func object(_ line: ArraySlice<UInt8>) throws(DecodeError) -> [String: Any]? {
        guard line.contains(where: { $0 != 0x20 && $0 != 0x0D && $0 != 0x09 }) else { return nil }
        guard let object = (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any] else {
            throw .notAnObject(String(decoding: line.prefix(120), as: UTF8.self))
        }
        return object
    }
}

/// A point in time on the monotonic clock (wall-clock changes do not move it).
struct MonotonicDeadline {
    let at: Double

    init(seconds: Double) { at = Self.now() + max(0, seconds) }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    var remaining: Double { max(0, at - Self.now()) }
    var expired: Bool { Self.now() >= at }
    /// For poll(2): whole milliseconds, rounded up, so a wait never ends before the deadline.
    var pollMilliseconds: Int32 { Int32(min(Double(Int32.max), (remaining * 1000).rounded(.up))) }
}

// MARK: - Client

/// A client of the QEMU guest agent, on the host side of its channel: the unix socket of the
/// chardev that QEMU connects to the guest's virtio-serial port `org.qemu.guest_agent.0`
/// (`-chardev socket,path=SOCK,server=on,wait=off,id=qga0 -device virtio-serial-pci
/// -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`).
///
/// The channel is a byte stream that outlives connections: the agent may still be answering a
/// previous client, or a command this client gave up on. So the client resynchronises with
/// `guest-sync-delimited` (0xFF, then the command with a random id; everything up to the
/// agent's 0xFF is dropped, then replies up to the one echoing the id) when it connects and
/// again before the next command after any timeout or broken reply.
///
/// Synchronous and one command at a time (others wait their turn). The socket is
/// non-blocking; every read and write waits in poll(2) with the command's deadline, so a
/// silent agent ends in a timeout error, never a hang. `close()` from another thread wakes a
/// command that is waiting.
public final class GuestAgentClient: @unchecked Sendable {
    // @unchecked: `fd` and `closing` are guarded by `stateLock`; `decoder` and `inSync` are
    // used only by the thread holding `exchangeLock` (one command at a time); the descriptor
    // is closed only while holding both, so no command can be using it.
    public let path: String
    private let stateLock = NSLock()
    private let exchangeLock = NSLock()
    private var fd: Int32
    private var closing = false
    private var decoder = GuestAgentDecoder()
    private var inSync = false

    /// The name QEMU's virtio-serial port must have for qemu-ga to find it.
    public static let channelName = "org.qemu.guest_agent.0"

    /// Connects to the host side of the agent channel (a unix socket chardev) and resyncs
    /// (guest-sync-delimited), all within `timeout` seconds. A socket that is missing or has no
    /// listener fails at once; a socket whose connection queue is full (QEMU serves one client
    /// at a time) is retried until the timeout.
    public static func connect(path: String, timeout: Double = 10) throws -> GuestAgentClient {
        let deadline = MonotonicDeadline(seconds: timeout)
        let fd = try connectSocket(path: path, deadline: deadline, limit: timeout)
        let client = GuestAgentClient(path: path, fd: fd)
        do {
            client.exchangeLock.lock()
            defer { client.exchangeLock.unlock() }
            try client.resync(deadline: deadline, limit: timeout)
        } catch {
            client.close()
            throw error
        }
        return client
    }

    private init(path: String, fd: Int32) {
        self.path = path
        self.fd = fd
    }

    deinit { close() }

    /// `guest-ping`: the agent is there and answering.
    public func ping(timeout: Double = 10) throws {
        try execute("guest-ping", timeout: timeout)
    }

    /// `guest-fsfreeze-status`: "thawed" or "frozen".
    public func fsfreezeStatus(timeout: Double = 10) throws -> String {
        let reply = try execute("guest-fsfreeze-status", timeout: timeout)
        guard let status = reply as? String, status == "thawed" || status == "frozen" else {
            throw CairnError(.io, "guest agent guest-fsfreeze-status: unexpected reply \(Self.describe(reply))", path: path)
        }
        return status
    }

    /// `guest-fsfreeze-freeze`: freezes every file system the agent can (FIFREEZE); returns how
    /// many. While frozen the agent refuses most commands (ping, status and thaw still work).
    /// Should the freeze fail part-way, qemu-ga thaws what it froze before it replies.
    @discardableResult
    public func freeze(timeout: Double = 60) throws -> Int {
        try count(execute("guest-fsfreeze-freeze", timeout: timeout), command: "guest-fsfreeze-freeze")
    }

    /// `guest-fsfreeze-thaw`: thaws what the agent froze; returns how many file systems (0 when
    /// nothing was frozen).
    @discardableResult
    public func thaw(timeout: Double = 60) throws -> Int {
        try count(execute("guest-fsfreeze-thaw", timeout: timeout), command: "guest-fsfreeze-thaw")
    }

    /// Runs `command` and returns its `return` value (JSONSerialization values). An `error`
    /// reply throws a `CairnError` naming the command, the socket, the agent's error class and
    /// description. Only for commands that reply (not guest-shutdown or guest-suspend-*).
    @discardableResult
    package func execute(_ command: String, arguments: [String: Any]? = nil, timeout: Double) throws -> Any {
        exchangeLock.lock()
        defer { exchangeLock.unlock() }
        let deadline = MonotonicDeadline(seconds: timeout)
        if !inSync { try resync(deadline: deadline, limit: timeout) }
        var message: [String: Any] = ["execute": command]
        if let arguments { message["arguments"] = arguments }
        guard JSONSerialization.isValidJSONObject(message),
              var bytes = try? JSONSerialization.data(withJSONObject: message) else {
            throw CairnError(.usage, "guest agent \(command): the arguments are not JSON values", path: path)
        }
        bytes.append(0x0A)
        // Out of sync until the reply is in: a timeout or a broken reply leaves the stream
        // in an unknown state, and the next command resyncs first.
        inSync = false
        try send(bytes, command: command, deadline: deadline, limit: timeout)
        let reply = try receive(command: command, deadline: deadline, limit: timeout)
        if let error = reply["error"] as? [String: Any] {
            inSync = true
            let cls = error["class"] as? String ?? "UnknownError"
            let desc = error["desc"] as? String ?? "(no description)"
            throw CairnError(cls == "CommandNotFound" ? .unsupported : .io,
                             "guest agent \(command) failed: \(cls): \(desc)", path: path, hint: Self.hint(command: command, errorClass: cls))
        }
        guard let value = reply["return"] else {
            throw CairnError(.io, "guest agent \(command): a reply with neither return nor error: \(Self.describe(reply))", path: path,
                             hint: "the channel may not be a guest agent's; is its virtserialport named \(Self.channelName)?")
        }
        inSync = true
        return value
    }

    /// Closes the connection (idempotent). A command waiting for a reply wakes with an error.
    public func close() {
        stateLock.lock()
        guard fd >= 0, !closing else {
            stateLock.unlock()
            return
        }
        closing = true
        let socket = fd
        stateLock.unlock()
        _ = shutdown(socket, Int32(SHUT_RDWR))
        exchangeLock.lock()
        stateLock.lock()
        _ = Glibc.close(socket)
        fd = -1
        stateLock.unlock()
        exchangeLock.unlock()
    }

    // MARK: Protocol

    /// guest-sync-delimited with a fresh id; returns once the agent echoed it.
    private func resync(deadline: MonotonicDeadline, limit: Double) throws {
        inSync = false
        let id = Int.random(in: 1...Int(Int32.max))
        decoder.awaitSentinel()
        // The leading 0xFF makes the agent drop any half-read input of an earlier client (it
        // answers with a parse error, which arrives before its sentinel and is dropped).
        var bytes: [UInt8] = [GuestAgentDecoder.sentinel]
        bytes += Array(#"{"execute": "guest-sync-delimited", "arguments": {"id": \#(id)}}"#.utf8)
        bytes.append(0x0A)
        try send(Data(bytes), command: "guest-sync-delimited", deadline: deadline, limit: limit)
        while true {
            let reply = try receive(command: "guest-sync-delimited", deadline: deadline, limit: limit, skippingGarbage: true)
            if let echoed = reply["return"] as? NSNumber, echoed.int64Value == Int64(id) {
                inSync = true
                return
            }
            // A stale reply that followed a stale sentinel: keep reading.
        }
    }

    private func currentSocket(_ command: String) throws -> Int32 {
        stateLock.lock()
        defer { stateLock.unlock() }
        guard fd >= 0, !closing else {
            throw CairnError(.io, "guest agent \(command): the connection is closed", path: path)
        }
        return fd
    }

    private func send(_ bytes: Data, command: String, deadline: MonotonicDeadline, limit: Double) throws {
        try bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            guard let base = raw.baseAddress else { return }
            var done = 0
            while done < raw.count {
                let socket = try currentSocket(command)
                let n = Glibc.send(socket, base + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n >= 0 {
                    done += n
                    continue
                }
                let err = errno
                if err == EINTR { continue }
                if err == EAGAIN || err == EWOULDBLOCK {
                    guard try Self.wait(socket, for: Int16(POLLOUT), until: deadline, path: path) else {
                        throw timeoutError(command, limit: limit, sending: true)
                    }
                    continue
                }
                if err == EPIPE || err == ECONNRESET {
                    throw CairnError(.io, "guest agent \(command): the agent socket was closed (QEMU exited, or another client was dropped)", path: path)
                }
                throw CairnError.errno("send \(command) to the guest agent", err, path: path)
            }
        }
    }

    /// The next object from the agent. A line that cannot be decoded throws, or, when
    /// `skippingGarbage` (a resync, whose own sentinel is still to come), sends the decoder back
    /// to waiting for a sentinel.
    private func receive(command: String, deadline: MonotonicDeadline, limit: Double, skippingGarbage: Bool = false) throws -> [String: Any] {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            do {
                if let object = try decoder.next() { return object }
            } catch {
                decoder.awaitSentinel()
                if skippingGarbage { continue }
                switch error {
                case .notAnObject(let text):
                    throw CairnError(.io, "guest agent \(command): the agent sent something that is not a JSON object: \(text)", path: path,
                                     hint: "is this socket the guest agent's channel (a virtserialport named \(Self.channelName)), not a console or a QMP monitor?")
                case .lineTooLong(let count):
                    throw CairnError(.io, "guest agent \(command): a reply line longer than \(count) bytes", path: path)
                }
            }
            let socket = try currentSocket(command)
            let n = chunk.withUnsafeMutableBytes { read(socket, $0.baseAddress, $0.count) }
            if n > 0 {
                decoder.feed(chunk[0..<n])
                continue
            }
            if n == 0 {
                throw CairnError(.io, "guest agent \(command): the agent socket closed before the reply (QEMU exited, or the connection was closed)", path: path)
            }
            let err = errno
            if err == EINTR { continue }
            if err == EAGAIN || err == EWOULDBLOCK {
                guard try Self.wait(socket, for: Int16(POLLIN), until: deadline, path: path) else {
                    throw timeoutError(command, limit: limit, sending: false)
                }
                continue
            }
            throw CairnError.errno("read from the guest agent (\(command))", err, path: path)
        }
    }

    private func timeoutError(_ command: String, limit: Double, sending: Bool) -> CairnError {
        var hint = "is qemu-ga running in the guest, on a virtio-serial port named \(Self.channelName)? "
            + "The agent socket serves one client at a time: another client may hold it"
        if command == "guest-fsfreeze-freeze" {
            hint += "; the freeze may still complete: check guest-fsfreeze-status and thaw"
        }
        let what = sending ? "the agent did not take the command" : "no reply"
        return CairnError(.io, "guest agent \(command): \(what) within \(QMPClient.seconds(limit))", path: path, hint: hint)
    }

    private static func hint(command: String, errorClass: String) -> String? {
        if errorClass == "CommandNotFound" {
            return "this qemu-ga does not offer \(command), or it is disabled (qemu-ga -b / --allow-rpcs)"
        }
        switch command {
        case "guest-fsfreeze-freeze":
            return "qemu-ga thaws what it froze when a freeze fails; a guest already frozen must be thawed first"
        case "guest-fsfreeze-thaw":
            return "check guest-fsfreeze-status; qemu-ga in the guest can be restarted to thaw"
        default:
            return nil
        }
    }

    private func count(_ reply: Any, command: String) throws -> Int {
        guard let n = reply as? NSNumber, let value = Int(exactly: n.doubleValue) else {
            throw CairnError(.io, "guest agent \(command): expected a number of file systems, got \(Self.describe(reply))", path: path)
        }
        return value
    }

    static func describe(_ value: Any) -> String {
        if JSONSerialization.isValidJSONObject([value]), let d = try? JSONSerialization.data(withJSONObject: [value]) {
            return String(String(decoding: d, as: UTF8.self).dropFirst().dropLast().prefix(200))
        }
        return String(describing: value).prefix(200).description
    }

    // MARK: Socket

    /// true when `events` are ready, false at the deadline.
    private static func wait(_ socket: Int32, for events: Int16, until deadline: MonotonicDeadline, path: String) throws -> Bool {
        var pfd = pollfd(fd: socket, events: events, revents: 0)
        while true {
            let rc = poll(&pfd, 1, deadline.pollMilliseconds)
            if rc > 0 { return true }
            if rc == 0 {
                if deadline.expired { return false }
                continue
            }
            if errno == EINTR { continue }
            throw CairnError.errno("poll on the guest-agent socket", errno, path: path)
        }
    }

    private static func connectSocket(path: String, deadline: MonotonicDeadline, limit: Double) throws -> Int32 {
        let address = try UnixSocketAddress(path: path, what: "guest-agent")
        let channelHint = "is the VM running with -chardev socket,path=\(path),server=on,wait=off,id=qga0 "
            + "-device virtio-serial-pci -device virtserialport,chardev=qga0,name=\(channelName)?"
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { throw CairnError.errno("socket", errno, path: path) }
            var err = address.connect(fd)
            if err == EINPROGRESS {
                // Not done by unix sockets today; handled like TCP for safety.
                if try wait(fd, for: Int16(POLLOUT), until: deadline, path: path) {
                    var soError: Int32 = 0
                    var len = socklen_t(MemoryLayout<Int32>.size)
                    err = getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len) == 0 ? soError : errno
                } else {
                    err = EAGAIN
                }
            }
            if err == 0 { return fd }
            _ = Glibc.close(fd)
            switch err {
            case EINTR:
                continue
            case EAGAIN where !deadline.expired:
                // The listen queue is full: QEMU is serving another client.
                usleep(50_000)
                continue
            case EAGAIN:
                throw CairnError(.io, "cannot connect to the guest-agent socket within \(QMPClient.seconds(limit)): its queue is full", path: path,
                                 hint: "QEMU serves one agent client at a time and another holds the channel")
            case ENOENT, ECONNREFUSED:
                throw CairnError(err == ENOENT ? .notFound : .io,
                                 "cannot connect to the guest-agent socket: \(String(cString: strerror(err)))", path: path, hint: channelHint)
            default:
                throw CairnError.errno("connect to the guest-agent socket", err, path: path)
            }
        }
    }
}
