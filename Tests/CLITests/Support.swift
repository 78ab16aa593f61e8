import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

let KiB = 1 << 10
let MiB = 1 << 20

/// A scratch directory with a repository path and a `cairn` runner bound to it.
struct CLIEnv {
    let dir: TempDir
    let repo: String
    var cli: CairnCLI

    init(_ prefix: String, password: String? = "s3cret pass") throws {
        dir = try TempDir(prefix)
        repo = dir.file("repo")
        cli = try CairnCLI(repository: repo, password: password, scratch: dir.path)
    }

    func file(_ name: String) -> String { dir.file(name) }

    /// Runs cairn and records a test issue (with its output) unless it exits with `status`.
    @discardableResult
    func expect(_ status: Int32, _ args: [String], environment: [String: String?] = [:],
                sourceLocation: SourceLocation = #_sourceLocation) throws -> CLIResult {
        let r = try cli.run(args, environment: environment)
        #expect(r.exitedNormally && r.status == status, "expected exit status \(status): \(r)", sourceLocation: sourceLocation)
        return r
    }

    /// `cairn snapshots --json`, parsed.
    func snapshots(sourceLocation: SourceLocation = #_sourceLocation) throws -> [[String: Any]] {
        let r = try expect(0, ["snapshots", "--json"], sourceLocation: sourceLocation)
        let json = try JSONSerialization.jsonObject(with: r.stdoutData)
        return try #require(json as? [[String: Any]], "snapshots --json is an array of objects: \(r.stdout)", sourceLocation: sourceLocation)
    }

    /// Files in a repository subdirectory (recursively).
    func repoFiles(_ sub: String) -> [String] {
        let base = (repo as NSString).appendingPathComponent(sub)
        guard let e = FileManager.default.enumerator(atPath: base) else { return [] }
        var out: [String] = []
        while let rel = e.nextObject() as? String {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: (base as NSString).appendingPathComponent(rel), isDirectory: &isDir), !isDir.boolValue {
                out.append(rel)
            }
        }
        return out
    }
}

enum Disk {
    static func writeSparse(_ path: String, size: Int, segments: [(offset: Int, bytes: [UInt8])]) throws {
        let f = try PosixFile(path: path, flags: O_RDWR | O_CREAT | O_TRUNC)
        try f.truncate(to: UInt64(size))
        for s in segments { try s.bytes.withUnsafeBytes { try f.pwrite($0, at: UInt64(s.offset)) } }
        try f.fsync()
    }

    /// Random runs, a compressible run and holes, data in the first and last byte.
    static func mixed(_ path: String, size: Int, seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        var segs: [(offset: Int, bytes: [UInt8])] = []
        for i in 0..<12 {
            let length = Int.random(in: 1...min(size, 150_000), using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            segs.append((offset, i % 2 == 0 ? rng.bytes(length) : [UInt8](repeating: UInt8(i), count: length)))
        }
        segs.append((0, [0xA5]))
        segs.append((size - 1, [0x5A]))
        try writeSparse(path, size: size, segments: segs)
    }

    static func dense(_ path: String, size: Int, seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        let f = try PosixFile(path: path, flags: O_RDWR | O_CREAT | O_TRUNC)
        var done = 0
        while done < size {
            let n = min(4 * MiB, size - done)
            try rng.bytes(n).withUnsafeBytes { try f.pwrite($0, at: UInt64(done)) }
            done += n
        }
        try f.fsync()
    }

    static func cmpEqual(_ a: String, _ b: String) throws -> Bool {
        try Tool.run("cmp", ["-s", a, b], check: false).status == 0
    }
}

extension Dictionary where Key == String, Value == Any {
    func int(_ key: String) -> Int? { (self[key] as? NSNumber)?.intValue }
    func string(_ key: String) -> String? { self[key] as? String }
}
