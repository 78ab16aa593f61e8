import CairnCore
import Foundation
import NBDServer
#if canImport(Glibc)
import Glibc
#endif

/// What a guest file system's own checker said about a volume.
package enum NativeCheckOutcome: Sendable, Equatable {
    /// The checker ran and exited 0; the text is its command line and last output line.
    case clean(String)
    /// The checker ran and reported damage (or failed); the text names the checker, its exit
    /// status and its last output lines.
    case failed(String)
    /// Not run (no checker for this type, a tool missing, no FUSE); the text says why.
    case notRun(String)
}

/// Runs a file system's native checker read-only against a volume of a snapshot
/// (docs/VERIFY.md, "filesystem"): the volume is exported by an in-process `NBDServer` on a
/// unix socket in a private temporary directory, `nbdfuse -r` maps the export to a file, and
/// the checker reads that file. Everything is torn down afterwards whatever happened: the
/// checker is killed at the timeout, the FUSE mount is unmounted, nbdfuse waited for (and
/// killed if it does not exit), the server shut down and the directory removed.
package struct NativeChecker: Sendable {
    /// The checker program and its read-only options; the volume's file is appended.
    package var tool: String
    package var arguments: [String]

    /// The read-only checker for a file system type (`FileSystem.typeName`, or the reader's
    /// type for a damaged volume), or nil when there is none.
    package static func forType(_ typeName: String) -> NativeChecker? {
        switch typeName {
        case "ext", "ext2", "ext3", "ext4": NativeChecker(tool: "e2fsck", arguments: ["-fn"])
        case "xfs": NativeChecker(tool: "xfs_repair", arguments: ["-n", "-f"])
        case "vfat", "fat", "fat12", "fat16", "fat32": NativeChecker(tool: "fsck.fat", arguments: ["-n"])
        case "ntfs": NativeChecker(tool: "ntfsfix", arguments: ["-n"])
        default: nil
        }
    }

    package var commandLine: String { ([tool] + arguments).joined(separator: " ") }

    /// An executable named `name` in PATH or the sbin directories, or nil.
    package static func which(_ name: String) -> String? {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "") + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// How many output lines end up in a reason.
    static let reasonLines = 6

    /// Checks `volume` (`label` names it in messages). Never throws: a missing tool or a broken
    /// mount is `.notRun`, an interrupt shows as `.notRun("interrupted")`.
    package func check(_ volume: any BlockSource, label: String, timeout: TimeInterval, cancel: CancellationToken) -> NativeCheckOutcome {
        guard let toolPath = Self.which(tool) else { return .notRun("\(tool) is not installed") }
        guard let nbdfuse = Self.which("nbdfuse") else { return .notRun("nbdfuse is not installed (package libnbd-bin)") }
        guard let fusermount = Self.which("fusermount3") else { return .notRun("fusermount3 is not installed (package fuse3)") }
        guard access("/dev/fuse", R_OK | W_OK) == 0 else { return .notRun("/dev/fuse is not usable here") }
        let dir: String
        do {
            dir = try Self.makeTemporaryDirectory()
        } catch {
            return .notRun("no temporary directory: \(error)")
        }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/nbd.sock", mount = dir + "/mnt", pidFile = dir + "/nbdfuse.pid"
        do {
            try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: false)
        } catch {
            return .notRun("cannot create \(mount): \(error)")
        }
        let server = NBDServer(exports: [NBDExport(name: "volume", description: label, source: volume)],
                               options: NBDServerOptions(ioThreads: 2))
        defer { server.shutdown() }
        do {
            try server.listen(unixSocket: socket)
        } catch {
            return .notRun("cannot export the volume over NBD: \(error)")
        }
        // nbdfuse runs until the mount is unmounted; -P writes its pid once it serves.
        let fuse: ChildProcess
        do {
            fuse = try ChildProcess(nbdfuse, ["-r", "-P", pidFile, mount, "nbd+unix:///volume?socket=\(socket)"], output: dir + "/nbdfuse.log")
        } catch {
            return .notRun("cannot start nbdfuse: \(error)")
        }
        var mounted = false
        defer {
            if mounted || fuse.isRunning {
                // Unmount (retried: a checker that just exited may still hold the file), then
                // make sure nbdfuse is gone.
                for attempt in 0..<20 {
                    let u = try? ChildProcess(fusermount, ["-u", mount], output: dir + "/fusermount.log")
                    if u?.wait(timeout: 10) == 0 || !Self.isMountPoint(mount) { break }
                    if attempt == 19 { _ = try? ChildProcess(fusermount, ["-u", "-z", mount], output: dir + "/fusermount.log").wait(timeout: 10) }
                    usleep(100_000)
                }
            }
            if fuse.wait(timeout: 10) == nil {
                fuse.kill(SIGTERM)
                if fuse.wait(timeout: 5) == nil { fuse.kill(SIGKILL); _ = fuse.wait(timeout: 5) }
            }
        }
        let deadline = Date().addingTimeInterval(30)
        while !mounted {
            if let pid = try? String(contentsOfFile: pidFile, encoding: .utf8), !pid.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty,
               FileManager.default.fileExists(atPath: mount + "/nbd") {
                mounted = true
                break
            }
            if !fuse.isRunning || Date() > deadline || cancel.isCancelled {
                let log = Self.lastLines(fuse.output(), count: 3)
                return .notRun(cancel.isCancelled ? "interrupted" : "nbdfuse did not map the export\(log.isEmpty ? "" : ": " + log)")
            }
            usleep(20_000)
        }
        let file = mount + "/nbd"
        let run: ChildProcess
        do {
            run = try ChildProcess(toolPath, arguments + [file], output: dir + "/checker.log")
        } catch {
            return .notRun("cannot start \(tool): \(error)")
        }
        let stop = Date().addingTimeInterval(timeout)
        var status: Int32?
        while status == nil {
            status = run.wait(timeout: 0.2)
            if status == nil && (Date() > stop || cancel.isCancelled) {
                run.kill(SIGKILL)
                _ = run.wait(timeout: 10)
                return cancel.isCancelled ? .notRun("interrupted")
                    : .failed("\(commandLine) did not finish within \(Int(timeout)) s and was killed")
            }
        }
        let output = run.output().replacingOccurrences(of: file, with: label)
        let tail = Self.lastLines(output, count: Self.reasonLines)
        if status == 0 {
            return .clean("\(commandLine): clean" + (tail.isEmpty ? "" : " (\(Self.lastLines(output, count: 1)))"))
        }
        return .failed("\(commandLine) exited \(status!)" + (tail.isEmpty ? "" : ": " + tail))
    }

    /// The last `count` non-empty lines of `text`, joined with " | ".
    static func lastLines(_ text: String, count: Int) -> String {
        text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            .suffix(count).joined(separator: " | ")
    }

    static func isMountPoint(_ path: String) -> Bool {
        guard let mounts = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return false }
        return mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == path }
    }

    /// A private directory for the socket and the mount point; under /tmp when the usual
    /// temporary directory would make the socket path too long for a unix socket (108 bytes).
    static func makeTemporaryDirectory() throws -> String {
        var base = NSTemporaryDirectory()
        if base.hasSuffix("/") { base.removeLast() }
        if base.utf8.count > 60 { base = "/tmp" }
        var template = Array("\(base)/cairn-verify-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw CairnError.errno("mkdtemp", errno, path: base)
        }
        return String(cString: p)
    }
}

/// A child process with its output (stdout and stderr) in a file, waited for with a timeout.
final class ChildProcess: @unchecked Sendable {
    private let process = Process()
    private let outputPath: String

    init(_ executable: String, _ arguments: [String], output: String) throws {
        outputPath = output
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        guard let out = FileHandle(forWritingAtPath: output), let devNull = FileHandle(forReadingAtPath: "/dev/null") else {
            throw CairnError(.io, "cannot open the output file of \(executable)", path: output)
        }
        defer { try? out.close(); try? devNull.close() }
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = devNull
        process.standardOutput = out
        process.standardError = out
        var env = ProcessInfo.processInfo.environment
        env["LC_ALL"] = "C"
        process.environment = env
        do {
            try process.run()
        } catch {
            throw CairnError(.io, "cannot run \(executable): \(error)")
        }
    }

    var isRunning: Bool { process.isRunning }

    /// The exit status, or nil if still running after `timeout` seconds.
    func wait(timeout: TimeInterval) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning {
            if Date() >= deadline { return nil }
            usleep(5_000)
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    func kill(_ signal: Int32) {
        if process.isRunning { _ = Glibc.kill(process.processIdentifier, signal) }
    }

    func output() -> String {
        String(decoding: FileManager.default.contents(atPath: outputPath) ?? Data(), as: UTF8.self)
    }
}
