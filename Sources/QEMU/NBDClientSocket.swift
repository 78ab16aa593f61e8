// The NBD client's socket primitives: connect, send and receive with poll-based deadlines, and
// the receive buffer the reply reader decodes from.
import CairnCore
#if canImport(Glibc)
import Glibc
#endif

/// Why the socket could not carry on.
enum NBDSocketFailure: Error, Equatable {
    /// The peer closed the connection (end of stream).
    case closed
    case timedOut(String)
    case failed(call: String, errno: Int32)
    /// The other side broke the protocol (raised by the reader, carried the same way).
    case violation(String)

    var reason: String {
        switch self {
        case .closed: "the server closed the connection"
        case .timedOut(let what): what
        case .failed(let call, let err): "\(call) failed: \(String(cString: strerror(err))) (errno \(err))"
        case .violation(let what): "protocol violation by the server: \(what)"
        }
    }
}

/// Seconds on the monotonic clock.
func nbdNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Blocking-socket primitives with poll-based waits; never blocks past a deadline.
enum NBDSocket {
    /// Connects to `endpoint`, retrying while a unix socket does not exist yet or a server
    /// refuses connections (still starting) until `deadline`.
    static func connect(_ endpoint: NBDEndpoint, deadline: Double, name: String) throws -> Int32 {
        while true {
            let attempt: Result<Int32, NBDSocketFailure>
            switch endpoint {
            case .unix(let path): attempt = try connectUnix(path, deadline: deadline, name: name)
            case .tcp(let host, let port): attempt = try connectTCP(host, port, deadline: deadline, name: name)
            }
            switch attempt {
            case .success(let fd):
                return fd
            case .failure(let failure):
                if case .failed(_, let err) = failure, err == ENOENT || err == ECONNREFUSED || err == EAGAIN, nbdNow() < deadline {
                    usleep(50_000)
                    continue
                }
                throw CairnError(.io, "cannot connect to the NBD server at \(endpoint): \(failure.reason)", path: name,
                                 hint: "check that the server (qemu-nbd, qemu-storage-daemon, nbdkit) runs and listens there")
            }
        }
    }

    private static func connectUnix(_ path: String, deadline: Double, name: String) throws -> Result<Int32, NBDSocketFailure> {
        let address = try UnixSocketAddress(path: path, what: "NBD")
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(.failed(call: "socket", errno: errno)) }
        let err = address.connect(fd)
        if err == 0 { return .success(fd) }
        _ = Glibc.close(fd)
        return .failure(.failed(call: "connect", errno: err))
    }

    private static func connectTCP(_ host: String, _ port: Int, deadline: Double, name: String) throws -> Result<Int32, NBDSocketFailure> {
        guard (1...65535).contains(port) else { throw CairnError(.usage, "NBD port \(port) is not in 1...65535", path: name) }
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw CairnError(.io, "cannot resolve the NBD host \(host): \(String(cString: gai_strerror(rc)))", path: name)
        }
        defer { freeaddrinfo(list) }
        var last = NBDSocketFailure.failed(call: "connect", errno: ECONNREFUSED)
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let a = entry {
            entry = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else {
                last = .failed(call: "socket", errno: errno)
                continue
            }
            var err: Int32 = 0
            if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) != 0 {
                err = errno
                if err == EINPROGRESS {
                    if waitFor(fd, events: Int16(POLLOUT), until: deadline) {
                        var soError: Int32 = 0
                        var len = socklen_t(MemoryLayout<Int32>.size)
                        err = getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len) == 0 ? soError : errno
                    } else {
                        _ = Glibc.close(fd)
                        return .failure(.timedOut("no TCP connection within the timeout"))
                    }
                }
            }
            if err == 0 {
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return .success(fd)
            }
            _ = Glibc.close(fd)
            last = .failed(call: "connect", errno: err)
        }
        return .failure(last)
    }

    /// Waits until `fd` has `events` (or an error/hang-up) or `deadline` passes; false on timeout.
    static func waitFor(_ fd: Int32, events: Int16, until deadline: Double) -> Bool {
        while true {
            let left = deadline - nbdNow()
            if left <= 0 { return false }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let rc = poll(&p, 1, Int32(min(left * 1000 + 1, 60_000)))
            if rc > 0 { return true }
            if rc < 0 && errno != EINTR { return true }  // let the next call report the error
        }
    }

    /// Sends all of `bytes`, waiting for buffer space until `deadline`.
    static func send(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, deadline: Double) -> NBDSocketFailure? {
        guard let base = bytes.baseAddress else { return nil }
        var done = 0
        while done < bytes.count {
            let n = Glibc.send(fd, base + done, bytes.count - done, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n > 0 {
                done += n
                continue
            }
            let err = errno
            if n < 0 && err == EINTR { continue }
            if n < 0 && (err == EAGAIN || err == EWOULDBLOCK) {
                if !waitFor(fd, events: Int16(POLLOUT), until: deadline) {
                    return .timedOut("the server accepted no data within the timeout")
                }
                continue
            }
            return .failed(call: "send", errno: n < 0 ? err : EPIPE)
        }
        return nil
    }

    /// Fills `buffer` exactly; `wait` blocks until the socket may be readable (or throws).
    static func receive(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, wait: () throws(NBDSocketFailure) -> Void) throws(NBDSocketFailure) {
        var done = 0
        while done < buffer.count {
            done += try receiveSome(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), wait: wait)
        }
    }

    /// Reads what is there, at least one byte (waiting with `wait` while nothing is); throws
    /// `.closed` at end of stream. `buffer` must not be empty.
    static func receiveSome(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, wait: () throws(NBDSocketFailure) -> Void) throws(NBDSocketFailure) -> Int {
        while true {
            let n = recv(fd, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT))
            if n > 0 { return n }
            if n == 0 { throw .closed }
            let err = errno
            if err == EINTR { continue }
            if err == EAGAIN || err == EWOULDBLOCK {
                try wait()
                continue
            }
            throw .failed(call: "recv", errno: err)
        }
    }
}

/// Buffered reads from the socket for the reply reader: headers and small payloads come from
/// a buffer; large payloads go straight into the caller's memory.
struct NBDReceiver: ~Copyable {
    let fd: Int32
    private let storage: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0
    private let wait: () throws(NBDSocketFailure) -> Void

    init(fd: Int32, capacity: Int = 256 << 10, wait: @escaping () throws(NBDSocketFailure) -> Void) {
        self.fd = fd
        storage = .allocate(byteCount: capacity, alignment: 16)
        self.wait = wait
    }

    deinit { storage.deallocate() }

    /// Fills `dst` exactly.
    mutating func read(into dst: UnsafeMutableRawBufferPointer) throws(NBDSocketFailure) {
        var done = 0
        while done < dst.count {
            if start < end {
                let n = min(end - start, dst.count - done)
                UnsafeMutableRawBufferPointer(rebasing: dst[done..<done + n])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: storage[start..<start + n]))
                start += n
                done += n
                continue
            }
            let left = dst.count - done
            if left >= storage.count / 2 {
                try NBDSocket.receive(fd, into: UnsafeMutableRawBufferPointer(rebasing: dst[done...]), wait: wait)
                return
            }
            try refill()
        }
    }

    mutating func bytes(_ count: Int) throws(NBDSocketFailure) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var failure: NBDSocketFailure?
        out.withUnsafeMutableBytes { buf in
            do throws(NBDSocketFailure) { try read(into: buf) } catch { failure = error }
        }
        if let failure { throw failure }
        return out
    }

    private mutating func refill() throws(NBDSocketFailure) {
        start = 0
        end = 0
        end = try NBDSocket.receiveSome(fd, into: storage, wait: wait)
    }
}
