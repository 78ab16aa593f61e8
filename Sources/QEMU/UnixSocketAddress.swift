import CairnCore
#if canImport(Glibc)
import Glibc
#endif

/// A unix socket address checked to fit `sun_path`, shared by the QMP, guest-agent and NBD
/// clients (each keeps its own retry and timeout policy around `connect`).
struct UnixSocketAddress {
    private var storage = sockaddr_un()

    /// Throws `.usage` naming `what` ("QMP", "guest-agent", "NBD") when the path is empty or
    /// longer than `sun_path` allows.
    init(path: String, what: String) throws {
        storage.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: storage.sun_path)
        guard !path.isEmpty, path.utf8.count < capacity else {
            throw CairnError(.usage, "the \(what) socket path is empty or longer than \(capacity - 1) bytes", path: path)
        }
        withUnsafeMutableBytes(of: &storage.sun_path) { raw in
            raw.copyBytes(from: path.utf8)
            raw[path.utf8.count] = 0
        }
    }

    /// bind(2) of `fd` to this address (the test servers' side): 0, or the errno.
    func bind(_ fd: Int32) -> Int32 {
        var addr = storage
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return rc == 0 ? 0 : errno
    }

    /// connect(2) of `fd` to this address: 0, or the errno it failed with.
    func connect(_ fd: Int32) -> Int32 {
        var addr = storage
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return rc == 0 ? 0 : errno
    }
}
