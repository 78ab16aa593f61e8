import CairnCore
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error without buffering.
func printError(_ s: String) {
    FileHandle.standardError.write(Data((s + "\n").utf8))
}

func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }

/// Progress on a terminal: one redrawn line with a bar, rate and ETA. In a pipe: a plain line
/// every few seconds. With --json: one JSON object per line on standard output.
final class TerminalProgress: ProgressReporter, @unchecked Sendable {
    enum Mode { case bar, lines, json, quiet }
    let mode: Mode
    private let lastLine = Mutex<Double>(0)

    init(json: Bool, quiet: Bool) {
        if json { mode = .json } else if quiet { mode = .quiet } else if isTerminal(2) { mode = .bar } else { mode = .lines }
    }

    func report(_ p: ProgressSnapshot) {
        switch mode {
        case .quiet: return
        case .json:
            let obj: [String: Any] = ["type": "progress", "phase": p.phase, "done_bytes": p.doneBytes, "total_bytes": p.totalBytes,
                                      "read_bytes": p.readBytes, "new_bytes": p.newBytes, "elapsed_seconds": p.elapsedSeconds]
            printJSONLine(obj)
        case .bar:
            FileHandle.standardError.write(Data(("\r" + line(p, bar: true) + "\u{1B}[K").utf8))
        case .lines:
            let due = lastLine.withLock { last -> Bool in
                if p.elapsedSeconds - last >= 5 { last = p.elapsedSeconds; return true }
                return false
            }
            if due { printError(line(p, bar: false)) }
        }
    }

    func finish(_ p: ProgressSnapshot) {
        switch mode {
        case .quiet, .json: return
        case .bar: FileHandle.standardError.write(Data(("\r" + line(p, bar: true) + "\u{1B}[K\n").utf8))
        case .lines: printError(line(p, bar: false))
        }
    }

    private func line(_ p: ProgressSnapshot, bar: Bool) -> String {
        let frac = p.totalBytes == 0 ? 1 : min(1, Double(p.doneBytes) / Double(p.totalBytes))
        let rate = p.elapsedSeconds > 0 ? Double(p.doneBytes) / p.elapsedSeconds : 0
        var eta = "--:--"
        if rate > 0, frac < 1 { eta = duration(Double(p.totalBytes - p.doneBytes) / rate) }
        var s = "\(p.phase) "
        if bar {
            let width = 24
            let filled = Int(frac * Double(width))
            s += "[" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled) + "] "
        }
        s += String(format: "%5.1f%% ", frac * 100)
        s += "\(ByteCount.format(p.doneBytes))/\(ByteCount.format(p.totalBytes)) "
        s += "\(ByteCount.format(UInt64(rate)))/s "
        if p.readBytes > 0 { s += "read \(ByteCount.format(p.readBytes)) " }
        if p.newBytes > 0 { s += "new \(ByteCount.format(p.newBytes)) " }
        s += "ETA \(eta)"
        return s
    }
}

func duration(_ seconds: Double) -> String {
    let s = Int(seconds.rounded())
    if s >= 3600 { return String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) }
    return String(format: "%d:%02d", s / 60, s % 60)
}

func printJSONLine(_ obj: Any) {
    if let d = try? JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys]) {
        FileHandle.standardOutput.write(d + Data("\n".utf8))
    }
}

/// Reads a password from the terminal without echo.
func promptPassword(_ prompt: String) -> String? {
    guard isTerminal(0) else { return nil }
    FileHandle.standardError.write(Data(prompt.utf8))
    var old = termios()
    tcgetattr(0, &old)
    var noEcho = old
    noEcho.c_lflag &= ~tcflag_t(ECHO)
    tcsetattr(0, TCSANOW, &noEcho)
    defer {
        tcsetattr(0, TCSANOW, &old)
        FileHandle.standardError.write(Data("\n".utf8))
    }
    return readLine(strippingNewline: true)
}
