import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Evidence (serial log, screenshot, QEMU's stderr), failure reasons and test scripts of one
/// sandbox run.
extension SandboxMachine {
    // MARK: - Evidence

    /// QEMU's stderr (the first 64 KiB).
    func stderrText() -> String { Self.readStderr(stderrPath) }

    static func readStderr(_ path: String) -> String {
        guard let f = try? PosixFile(path: path, flags: O_RDONLY | O_CLOEXEC) else { return "" }
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = (try? buf.withUnsafeMutableBytes { try f.preadSome(into: $0, at: 0) }) ?? 0
        return String(decoding: buf[0..<max(0, n)], as: UTF8.self)
    }

    /// The last meaningful lines of QEMU's stderr, on one line (warnings about CPU features dropped).
    func stderrTail(lines: Int = 3) -> String {
        let kept = stderrText().split(whereSeparator: { $0 == "\n" || $0 == "\r\n" }).map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty && !$0.contains("host doesn't support requested feature") }
        return kept.suffix(lines).joined(separator: " | ")
    }

    /// The serial console output, at most its last 4 MiB.
    func serialLog() -> [UInt8] {
        guard let f = try? PosixFile(path: serialPath, flags: O_RDONLY | O_CLOEXEC), let size = try? f.byteSize() else { return [] }
        let limit: UInt64 = 4 << 20
        let from = size > limit ? size - limit : 0
        var buf = [UInt8](repeating: 0, count: Int(size - from))
        let n = (try? buf.withUnsafeMutableBytes { try f.preadSome(into: $0, at: from) }) ?? 0
        return Array(buf[0..<max(0, n)])
    }

    /// A QMP `screendump` as PNG bytes; nil if QEMU is gone or the dump failed.
    func screenshot() -> [UInt8]? {
        guard process.isRunning, let qmp, qmp.isConnected else { return nil }
        let path = screenshotPath
        defer { unlink(path) }
        guard (try? qmp.execute("screendump", arguments: ["filename": path, "format": "png"], timeout: 15)) != nil,
              let data = FileManager.default.contents(atPath: path) else { return nil }
        let bytes = [UInt8](data)
        guard bytes.starts(with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) else { return nil }
        return bytes
    }

    /// Why the wait failed, with the last serial lines.
    func describeFailure(_ result: HeartbeatResult, timeout: Double) -> String {
        let serial = "; " + lastSerialLines()
        switch result {
        case .heartbeat: return "heartbeat seen"
        case .timedOut:
            return "no heartbeat within \(formatSeconds(timeout)) (\(plan.heartbeat)); the VM was killed" + serial
        case .qemuExited(let status, let stderr):
            return "QEMU exited with status \(status) before the heartbeat" + (stderr.isEmpty ? "" : " (\(stderr))") + serial
        case .kvmError(let text):
            return "KVM failed before the heartbeat (\(text))" + serial
        case .poweredOff:
            return "the guest powered off before the heartbeat (\(plan.heartbeat))" + serial
        case .stopped(let state):
            return "the VM stopped (\(state)) before the heartbeat" + (stderrTail().isEmpty ? "" : " (\(stderrTail()))") + serial
        case .cancelled:
            return "interrupted before the heartbeat" + serial
        }
    }

    private func lastSerialLines(_ count: Int = 5) -> String {
        // Split on bytes: "\r\n" is one Character in Swift.
        let lines = serialLog().suffix(64 << 10).split(whereSeparator: { $0 == 0x0A || $0 == 0x0D }).map { line -> String in
            // Escape sequences and other control characters out, long lines cut.
            let s = String(decoding: line, as: UTF8.self).unicodeScalars.filter { $0.value >= 0x20 && $0.value != 0x7F }
            let text = String(String.UnicodeScalarView(s)).trimmingCharacters(in: .whitespaces)
            return text.count > 200 ? String(text.prefix(200)) + "..." : text
        }.filter { !$0.isEmpty }
        if lines.isEmpty { return "the serial console stayed empty" }
        return "last serial lines: " + lines.suffix(count).joined(separator: " | ")
    }

    // MARK: - Test scripts

    /// Runs one test script; nil when it exits 0, else why it failed.
    func runTestScript(_ script: String, number: Int, environment: [String: String], timeout: Double, cancel: CancellationToken) -> String? {
        let outPath = work.file("script-\(number).out")
        defer { unlink(outPath) }
        guard FileManager.default.createFile(atPath: outPath, contents: nil), let out = FileHandle(forWritingAtPath: outPath) else {
            return "test script \(number) could not be started: cannot create its output file"
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", script]
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        p.environment = env
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = out
        p.standardError = out
        do {
            try p.run()
        } catch {
            try? out.close()
            return "test script \(number) could not be started: \(error.localizedDescription)"
        }
        try? out.close()
        let deadline = Date().addingTimeInterval(timeout)
        var killedFor: String?
        while p.isRunning {
            if cancel.isCancelled { killedFor = "was interrupted" }
            else if Date() >= deadline { killedFor = "did not finish within \(formatSeconds(timeout))" }
            if killedFor != nil {
                kill(p.processIdentifier, SIGKILL)
                break
            }
            usleep(50_000)
        }
        p.waitUntilExit()
        let output = String(decoding: FileManager.default.contents(atPath: outPath) ?? Data(), as: UTF8.self)
        let tail = output.split(whereSeparator: { $0 == "\n" || $0 == "\r\n" }).suffix(3).joined(separator: " | ")
        let label = "test script \(number) (\(script.count > 80 ? String(script.prefix(80)) + "..." : script))"
        if let killedFor { return "\(label) \(killedFor)" + (tail.isEmpty ? "" : ": \(tail)") }
        if p.terminationReason == .uncaughtSignal { return "\(label) was killed by signal \(p.terminationStatus)" + (tail.isEmpty ? "" : ": \(tail)") }
        if p.terminationStatus != 0 { return "\(label) exited with status \(p.terminationStatus)" + (tail.isEmpty ? "" : ": \(tail)") }
        return nil
    }
}
