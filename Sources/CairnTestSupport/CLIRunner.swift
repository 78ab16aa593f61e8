import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Finds the `cairn` executable the tests run.
///
/// Order: `$CAIRN_BIN` (must exist when set: no silent fallback), then the directory of the
/// test code (SwiftPM puts the test executable `<Package>PackageTests.xctest` and the tool in
/// the same `<scratch>/<triple>/<config>` directory; `<scratch>/<config>` is a symlink to it,
/// so paths are tried as given and with symlinks resolved).
/// Throws a `CairnError` that lists every place it looked, so a missing build fails the test
/// with a clear message instead of skipping it.
public enum CairnBinary {
    public static func locate() throws -> String {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["CAIRN_BIN"], !env.isEmpty {
            guard fm.isExecutableFile(atPath: env) else {
                throw CairnError(.notFound, "CAIRN_BIN is set to '\(env)', which is not an executable file",
                                 hint: "unset CAIRN_BIN or point it at a built cairn binary")
            }
            return env
        }
        var searched: [String] = []
        for exe in executableCandidates() {
            // The directory holding the test executable, or holding its bundle on macOS
            // (<config>/X.xctest/Contents/MacOS/X). Never further up: an unrelated `cairn`
            // elsewhere must not be picked up.
            var dir = (exe as NSString).deletingLastPathComponent
            if let bundle = exe.range(of: ".xctest/", options: .backwards) {
                dir = (String(exe[..<bundle.lowerBound]) as NSString).deletingLastPathComponent
            }
            let candidate = (dir as NSString).appendingPathComponent("cairn")
            if searched.contains(candidate) { continue }
            searched.append(candidate)
            var isDir: ObjCBool = false
            if fm.fileExists(atPath: candidate, isDirectory: &isDir), !isDir.boolValue, fm.isExecutableFile(atPath: candidate) {
                return candidate
            }
        }
        throw CairnError(.notFound, "the cairn binary was not found next to the test executable (looked at: \(searched.joined(separator: ", ")))",
                         hint: "build it first (`swift build --scratch-path <same scratch path>`) or set CAIRN_BIN to its path")
    }

    /// Absolute paths of the running test executable, by every means available.
    static func executableCandidates() -> [String] {
        var out: [String] = []
        func add(_ p: String?) {
            guard var p, !p.isEmpty else { return }
            if !p.hasPrefix("/") { p = (FileManager.default.currentDirectoryPath as NSString).appendingPathComponent(p) }
            p = (p as NSString).standardizingPath
            if !out.contains(p) { out.append(p) }
            // Also the path with symlinks resolved (`<scratch>/debug` -> `<triple>/debug`).
            let resolved = (p as NSString).resolvingSymlinksInPath
            if !out.contains(resolved) { out.append(resolved) }
        }
        #if canImport(Darwin)
        // The image this code is linked into: the bundle's binary, even when a helper process
        // (swiftpm-testing-helper, xctest) loaded it.
        var info = Dl_info()
        if dladdr(#dsohandle, &info) != 0, let name = info.dli_fname { add(String(cString: name)) }
        #endif
        add(Bundle.main.executablePath)
        add(CommandLine.arguments.first)
        #if os(Linux)
        add(try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        #endif
        return out
    }
}

/// The outcome of one `cairn` run.
public struct CLIResult: Sendable, CustomStringConvertible {
    /// Exit status, or the signal number when `signaled`.
    public var status: Int32
    public var signaled: Bool
    public var timedOut: Bool
    public var stdoutData: Data
    public var stderr: String
    public var arguments: [String]

    public var stdout: String { String(decoding: stdoutData, as: UTF8.self) }
    public var exitedNormally: Bool { !signaled && !timedOut }

    public var description: String {
        let how = timedOut ? "timed out" : signaled ? "killed by signal \(status)" : "exit status \(status)"
        return "cairn \(arguments.joined(separator: " ")): \(how)\nstdout: \(stdout)\nstderr: \(stderr)"
    }
}

/// A `cairn` process started in the background (for signal tests).
public final class RunningCLI: @unchecked Sendable {
    // @unchecked: the Process is only touched from the test's thread.
    let process: Process
    let stdoutPath: String
    let stderrPath: String
    let arguments: [String]
    let started = Date()

    init(process: Process, stdoutPath: String, stderrPath: String, arguments: [String]) {
        self.process = process
        self.stdoutPath = stdoutPath
        self.stderrPath = stderrPath
        self.arguments = arguments
    }

    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }
    public var elapsed: Double { Date().timeIntervalSince(started) }

    /// What the process has written to standard output so far (it keeps running).
    public var stdoutSoFar: String {
        String(decoding: FileManager.default.contents(atPath: stdoutPath) ?? Data(), as: UTF8.self)
    }

    /// What the process has written to standard error so far (it keeps running).
    public var stderrSoFar: String {
        String(decoding: FileManager.default.contents(atPath: stderrPath) ?? Data(), as: UTF8.self)
    }

    /// Sends `sig` to the process (harmless if it already exited but was not yet reaped).
    public func send(_ sig: Int32) {
        _ = kill(process.processIdentifier, sig)
    }

    /// Waits for the process; kills it with SIGKILL after `timeout` seconds (then `timedOut`).
    public func wait(timeout: Double = 300) -> CLIResult {
        let deadline = Date().addingTimeInterval(timeout)
        var timedOut = false
        while process.isRunning {
            if Date() > deadline {
                timedOut = true
                send(SIGKILL)
                break
            }
            usleep(2_000)
        }
        process.waitUntilExit()
        let out = FileManager.default.contents(atPath: stdoutPath) ?? Data()
        let err = FileManager.default.contents(atPath: stderrPath) ?? Data()
        try? FileManager.default.removeItem(atPath: stdoutPath)
        try? FileManager.default.removeItem(atPath: stderrPath)
        return CLIResult(status: process.terminationStatus, signaled: process.terminationReason == .uncaughtSignal,
                         timedOut: timedOut, stdoutData: out, stderr: String(decoding: err, as: UTF8.self), arguments: arguments)
    }
}

/// Runs the real `cairn` binary with a controlled environment: `CAIRN_REPO` and
/// `CAIRN_PASSWORD` come only from here (never inherited from the caller's shell), standard
/// input is /dev/null (so nothing ever prompts), output goes to files (no pipe can fill up).
public struct CairnCLI: Sendable {
    public let binary: String
    public var repository: String?
    public var password: String?
    /// Where stdout/stderr capture files live.
    public let scratch: String
    /// When set, the child runs under `ulimit -v` (KiB), so a runaway allocation fails fast.
    public var memoryLimitKiB: Int?

    public init(repository: String?, password: String?, scratch: String) throws {
        self.binary = try CairnBinary.locate()
        self.repository = repository
        self.password = password
        self.scratch = scratch
    }

    func environment(_ overrides: [String: String?]) -> [String: String] {
        var env = ProcessInfo.processInfo.environment
        env.removeValue(forKey: "CAIRN_REPO")
        env.removeValue(forKey: "CAIRN_PASSWORD")
        if let repository { env["CAIRN_REPO"] = repository }
        if let password { env["CAIRN_PASSWORD"] = password }
        for (k, v) in overrides {
            if let v { env[k] = v } else { env.removeValue(forKey: k) }
        }
        return env
    }

    /// Starts `cairn args...` and returns at once.
    public func start(_ args: [String], environment overrides: [String: String?] = [:]) throws -> RunningCLI {
        let tag = "\(UInt64.random(in: 0...UInt64.max))"
        let outPath = (scratch as NSString).appendingPathComponent("cli-\(tag).out")
        let errPath = (scratch as NSString).appendingPathComponent("cli-\(tag).err")
        guard FileManager.default.createFile(atPath: outPath, contents: nil),
              FileManager.default.createFile(atPath: errPath, contents: nil),
              let out = FileHandle(forWritingAtPath: outPath), let err = FileHandle(forWritingAtPath: errPath),
              let devNull = FileHandle(forReadingAtPath: "/dev/null")
        else {
            throw CairnError(.io, "cannot create output capture files", path: scratch)
        }
        let p = Process()
        if let limit = memoryLimitKiB {
            p.executableURL = URL(fileURLWithPath: "/bin/sh")
            p.arguments = ["-c", "ulimit -v \(limit) && exec \"$0\" \"$@\"", binary] + args
        } else {
            p.executableURL = URL(fileURLWithPath: binary)
            p.arguments = args
        }
        p.environment = environment(overrides)
        p.standardInput = devNull
        p.standardOutput = out
        p.standardError = err
        try p.run()
        try? out.close()
        try? err.close()
        try? devNull.close()
        return RunningCLI(process: p, stdoutPath: outPath, stderrPath: errPath, arguments: args)
    }

    /// Runs `cairn args...` to completion (killed after `timeout` seconds).
    @discardableResult
    public func run(_ args: [String], environment overrides: [String: String?] = [:], timeout: Double = 300) throws -> CLIResult {
        try start(args, environment: overrides).wait(timeout: timeout)
    }
}
