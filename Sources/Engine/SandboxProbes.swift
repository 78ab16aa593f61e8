import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif


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
