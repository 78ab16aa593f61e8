import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A tool a test starts in the background (QEMU, qemu-storage-daemon, qemu-nbd, nbdkit):
/// standard input and output on /dev/null, standard error in a file of the test's directory
/// (`stderr`, for the message of a failing expectation). Killed with SIGKILL by `stop()` or when
/// released: SIGTERM is not used, a child of the test runner may inherit it ignored.
public final class BackgroundTool: @unchecked Sendable {
    // @unchecked: used from the test's thread (and `stop` from one helper thread).
    private let process = Process()
    public let stderrPath: String

    public init(_ tool: String, _ arguments: [String], in dir: TempDir, stderrName: String? = nil) throws {
        stderrPath = dir.file(stderrName ?? "\(tool)-\(UUID().uuidString.prefix(6)).err")
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: try Tool.which(tool))
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle(forWritingAtPath: stderrPath)
        try process.run()
    }

    public var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }
    public var isRunning: Bool { process.isRunning }

    /// Waits up to `timeout` seconds for the tool to exit by itself.
    @discardableResult
    public func waitForExit(timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        return !process.isRunning
    }

    public func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stop() }
}
