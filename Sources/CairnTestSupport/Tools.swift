import Foundation
import CairnCore

/// Runs real tools (qemu-img, sfdisk, mke2fs...) for tests; tests build fixtures with them and
/// use them as referees.
public enum Tool {
    public struct Result: Sendable {
        public var status: Int32
        public var stdout: String
        public var stderr: String
        public var stdoutData: Data
    }

    /// Runs `executable` (searched in PATH and /usr/sbin, /sbin) with `arguments`.
    @discardableResult
    public static func run(_ executable: String, _ arguments: [String], environment: [String: String]? = nil,
                           stdin: Data? = nil, check: Bool = true) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try which(executable))
        p.arguments = arguments
        if let environment {
            var env = ProcessInfo.processInfo.environment
            for (k, v) in environment { env[k] = v }
            p.environment = env
        }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let inPipe = Pipe()
        p.standardInput = inPipe
        try p.run()
        if let stdin { inPipe.fileHandleForWriting.write(stdin) }
        try? inPipe.fileHandleForWriting.close()
        // Drain both pipes concurrently so a chatty tool cannot block.
        nonisolated(unsafe) var errData = Data()
        let g = DispatchGroup()
        g.enter()
        DispatchQueue.global().async {
            errData = err.fileHandleForReading.readDataToEndOfFile()
            g.leave()
        }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        g.wait()
        p.waitUntilExit()
        let r = Result(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                       stderr: String(decoding: errData, as: UTF8.self), stdoutData: outData)
        if check && r.status != 0 {
            throw CairnError(.io, "\(executable) \(arguments.joined(separator: " ")) exited \(r.status): \(r.stderr)\(r.stdout)")
        }
        return r
    }

    public static func which(_ name: String) throws -> String {
        if name.hasPrefix("/") { return name }
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw CairnError(.notFound, "tool \(name) not found in PATH", hint: "install it (see .ci/run)")
    }

    public static func exists(_ name: String) -> Bool { (try? which(name)) != nil }

    /// `qemu-img compare -q a b` succeeded (identical contents).
    public static func qemuImgCompare(_ a: String, _ b: String, formatA: String? = nil, formatB: String? = nil) throws -> Bool {
        var args = ["compare", "-q"]
        if let formatA { args += ["-f", formatA] }
        if let formatB { args += ["-F", formatB] }
        args += [a, b]
        return try run("qemu-img", args, check: false).status == 0
    }
}

/// A temporary directory removed when the value is deinitialized.
public final class TempDir: @unchecked Sendable {
    public let path: String

    public init(_ prefix: String = "cairn-test") throws {
        let base = ProcessInfo.processInfo.environment["CAIRN_TEST_TMP"] ?? NSTemporaryDirectory()
        let p = (base as NSString).appendingPathComponent("\(prefix)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        path = p
    }

    public func file(_ name: String) -> String { (path as NSString).appendingPathComponent(name) }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Deterministic pseudo-random bytes (SplitMix64), so fixtures are reproducible.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    public mutating func bytes(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { buf in
            var i = 0
            while i + 8 <= count { buf.storeBytes(of: next(), toByteOffset: i, as: UInt64.self); i += 8 }
            while i < count { buf[i] = UInt8(truncatingIfNeeded: next()); i += 1 }
        }
        return out
    }
}

/// Writes `bytes` at `offset` into the file at `path` (creating it), without truncating.
public func writeBytes(_ bytes: [UInt8], to path: String, at offset: UInt64) throws {
    let f = try PosixFile(path: path, flags: O_RDWR | O_CREAT)
    try bytes.withUnsafeBytes { try f.pwrite($0, at: offset) }
}

public func readFile(_ path: String) throws -> [UInt8] {
    guard let d = FileManager.default.contents(atPath: path) else { throw CairnError(.notFound, "cannot read", path: path) }
    return [UInt8](d)
}
