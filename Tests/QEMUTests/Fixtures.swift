import CairnCore
import CairnTestSupport
import Foundation
@testable import QEMU
#if canImport(Glibc)
import Glibc
#endif

/// A QEMU process (qemu-storage-daemon or qemu-system-x86_64) with a QMP socket, killed when
/// the test is done with it (tests that need a clean exit send QMP `quit` first; SIGTERM is
/// not used: a child of the test runner may inherit it ignored).
final class QEMUProcess: @unchecked Sendable {
    // @unchecked: used from the test's thread only.
    let tool: BackgroundTool
    let qmp: String

    /// qemu-storage-daemon with its monitor on `dir/qmp.sock` and `arguments` after it.
    static func storageDaemon(_ dir: TempDir, _ arguments: [String]) throws -> QEMUProcess {
        let qmp = dir.file("qmp.sock")
        return try QEMUProcess(dir, "qemu-storage-daemon",
                               ["--chardev", "socket,path=\(qmp),server=on,wait=off,id=m", "--monitor", "chardev=m"] + arguments, qmp: qmp)
    }

    /// qemu-system-x86_64 with no machine at all: only the monitor (TCG, nothing to boot).
    static func emptyMachine(_ dir: TempDir) throws -> QEMUProcess {
        let qmp = dir.file("vm-qmp.sock")
        return try QEMUProcess(dir, "qemu-system-x86_64",
                               ["-accel", "tcg", "-machine", "none", "-nodefaults", "-display", "none",
                                "-qmp", "unix:\(qmp),server=on,wait=off"], qmp: qmp)
    }

    private init(_ dir: TempDir, _ name: String, _ arguments: [String], qmp: String) throws {
        self.qmp = qmp
        tool = try BackgroundTool(name, arguments, in: dir)
    }

    func connect(commandTimeout: Double = 30) throws -> QMPClient {
        try QMPClient.connect(path: qmp, timeout: 20, commandTimeout: commandTimeout)
    }

    var stderr: String { tool.stderr }

    /// Waits up to `timeout` seconds for the process to exit by itself.
    @discardableResult
    func waitForExit(timeout: Double) -> Bool { tool.waitForExit(timeout: timeout) }

    func stop() { tool.stop() }
}

/// A QMP "server" that greets, accepts qmp_capabilities and then never answers: for the
/// command timeout.
final class SilentQMPServer: @unchecked Sendable {
    let path: String
    private let listener: Int32
    private let done = DispatchSemaphore(value: 0)

    init(path: String) throws {
        self.path = path
        unlink(path)
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let bound = try UnixSocketAddress(path: path, what: "test QMP").bind(listener)
        guard bound == 0, listen(listener, 4) == 0 else { throw CairnError.errno("bind", errno, path: path) }
        let fd = listener
        let done = self.done
        Thread {
            let c = accept(fd, nil, nil)
            guard c >= 0 else { return }
            func say(_ s: String) { _ = s.withCString { send(c, $0, strlen($0), Int32(MSG_NOSIGNAL)) } }
            say(#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 0}, "package": ""}, "capabilities": []}}"# + "\r\n")
            var buf = [UInt8](repeating: 0, count: 4096)
            var seen = 0
            while seen == 0 || !buf[0..<seen].contains(0x0A) {
                let n = read(c, &buf[seen], 4096 - seen)
                if n <= 0 { break }
                seen += n
            }
            say(#"{"return": {}, "id": 1}"# + "\r\n")
            done.wait()
            close(c)
        }.start()
    }

    func stop() {
        done.signal()
        close(listener)
        unlink(path)
    }
}

func jsonInt(_ any: Any?) -> Int? { (any as? NSNumber)?.intValue }
