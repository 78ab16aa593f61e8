import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The smallest guest-agent exchange that proves an agent runs in the guest: resync with
/// `guest-sync-delimited` (0xFF, then the request; the agent answers 0xFF then
/// `{"return": id}`, so anything older in the channel is skipped), then `guest-ping`.
/// Not a client: Sources/QEMU/GuestAgent.swift is that.
final class GuestAgentProbe {
    enum Result { case answered, silent, broken }

    private var fd: Int32
    private var buffer: [UInt8] = []
    private var nextID = Int.random(in: 1_000_000...9_000_000)

    private init(fd: Int32) { self.fd = fd }
    deinit { close() }

    /// Connects to the host side of the agent channel (QEMU's socket chardev); nil if it refuses.
    static func connect(path: String) -> GuestAgentProbe? {
        guard let fd = unixConnect(path) else { return nil }
        return GuestAgentProbe(fd: fd)
    }

    func close() {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }

    /// One sync and ping within `timeout` seconds.
    func ping(timeout: Double) -> Result {
        guard fd >= 0 else { return .broken }
        let deadline = Date().addingTimeInterval(timeout)
        let id = nextID
        nextID += 1
        var request: [UInt8] = [0xFF]
        request += Array(#"{"execute":"guest-sync-delimited","arguments":{"id":\#(id)}}"#.utf8) + [0x0A]
        switch send(request) {
        case .broken: return .broken
        case .silent: return .silent
        case .answered: break
        }
        // The reply to this sync: after a 0xFF, `{"return": id}`.
        var synced = false
        while !synced {
            guard let line = readLine(until: deadline) else { return fd < 0 ? .broken : .silent }
            guard let start = line.lastIndex(of: 0xFF) else { continue }
            if let obj = json(Array(line[(start + 1)...])), (obj["return"] as? NSNumber)?.intValue == id { synced = true }
        }
        switch send(Array(#"{"execute":"guest-ping"}"#.utf8) + [0x0A]) {
        case .broken: return .broken
        case .silent: return .silent
        case .answered: break
        }
        while true {
            guard let line = readLine(until: deadline) else { return fd < 0 ? .broken : .silent }
            // Late answers to older syncs carry a number; the ping's answer is an object.
            if let obj = json(line.filter { $0 != 0xFF }), obj["return"] is [String: Any] { return .answered }
        }
    }

    private func json(_ bytes: [UInt8]) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any]
    }

    /// Sends without blocking: a guest that does not read its port leaves QEMU's buffer full.
    private func send(_ bytes: [UInt8]) -> Result {
        let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
        if n == bytes.count { return .answered }
        if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) { return .silent }
        if n >= 0 { return .silent }
        close()
        return .broken
    }

    /// The next line (without its newline) received before `deadline`; nil on timeout or EOF.
    private func readLine(until deadline: Date) -> [UInt8]? {
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                return line
            }
            let wait = deadline.timeIntervalSinceNow
            guard wait > 0, fd >= 0 else { return nil }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(max(1, wait * 1000)))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { return nil }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n < 0 && (errno == EAGAIN || errno == EINTR) { continue }
            if n <= 0 {
                close()
                return nil
            }
            buffer += chunk[0..<n]
            if buffer.count > 1 << 20 { buffer.removeFirst(buffer.count - (1 << 20)) }
        }
    }
}

/// Whether a guest TCP service answers through a user-network host forward.
///
/// QEMU's user network accepts the host connection itself and only then connects to the guest,
/// so a successful connect proves nothing. The service answers when the connection sends data
/// (a banner), or stays open while QEMU's `info usernet` shows the guest side ESTABLISHED. A
/// guest that refuses makes QEMU close the connection (EOF): no answer.
enum TCPServiceProbe {
    static func answers(hostPort: Int, guestPort: Int, usernet: () -> String?) -> Bool {
        guard let fd = tcpConnectLoopback(port: hostPort, timeout: 1) else { return false }
        defer { _ = Glibc.close(fd) }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&pfd, 1, 1500)
        if ready > 0 {
            var byte: UInt8 = 0
            return recv(fd, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT)) > 0
        }
        guard let table = usernet() else { return false }
        return establishedToGuest(port: guestPort, usernet: table)
    }

    /// Whether HMP `info usernet` lists an ESTABLISHED TCP connection to guest port `port`.
    /// Its rows: `TCP[ESTABLISHED]  FD  SRC-ADDR SRC-PORT  DEST-ADDR DEST-PORT  RECV-Q SEND-Q`.
    static func establishedToGuest(port: Int, usernet: String) -> Bool {
        for line in usernet.split(whereSeparator: { $0 == "\n" || $0 == "\r" || $0 == "\r\n" }) {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            if f.count >= 6, f[0] == "TCP[ESTABLISHED]", f[5] == Substring(String(port)) { return true }
        }
        return false
    }
}

/// A connected unix stream socket; nil if it cannot connect now.
func unixConnect(_ path: String) -> Int32? {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    guard path.utf8.count < MemoryLayout.size(ofValue: addr.sun_path) else { return nil }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        raw.copyBytes(from: path.utf8)
        raw[path.utf8.count] = 0
    }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return nil }
    let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
    if rc != 0 {
        _ = Glibc.close(fd)
        return nil
    }
    return fd
}

/// A TCP connection to 127.0.0.1:`port` made within `timeout` seconds; nil if refused or slow.
func tcpConnectLoopback(port: Int, timeout: Double) -> Int32? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
    guard fd >= 0 else { return nil }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = UInt16(port).bigEndian
    let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    if rc != 0 {
        guard errno == EINPROGRESS else {
            _ = Glibc.close(fd)
            return nil
        }
        var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        var err: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        guard poll(&pfd, 1, Int32(timeout * 1000)) > 0, getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0, err == 0 else {
            _ = Glibc.close(fd)
            return nil
        }
    }
    return fd
}
